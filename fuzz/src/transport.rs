//! The transport's parsers: a real [`Channel`] of each kind receives what a hand-made peer
//! ([`RawPeer`]) writes: the hello, frame headers, payloads small and big, pings, the END
//! frame, cut frames, fds on the side socket, a ring's scribbled position.
//!
//! Two targets share this engine:
//! * `transport_frames`: the byte stream, as raw chunks (headers and all from the input);
//! * `transport_fds`: frames built from a few input bytes (flags, length, body), with the fd
//!   side channel's messages (0 to 3 fds, of several kinds) and raw hellos with any fds.
//!
//! Oracles: no panic; every error is hosing, reported once (the next call answers `Hosed`);
//! a frame is never longer than `max_frame` and carries an fd only on a channel with fds; once
//! the peer is gone the channel reports an end within a bounded number of turns.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use flowipc::poll::Pollable;
use flowipc::transport::{Channel, ChannelConfig, ChannelKind, Error, OutFrame};

use crate::peer::{header, Hello, RawPeer, FLAG_HELLO};
use crate::{some_fd, until_end, Input, Program, Seed, Turns};

/// The receiving channel and what it reported.
pub struct Receiver {
    chan: Channel,
    max_frame: u64,
    fds: bool,
    ended: bool,
}

impl Receiver {
    /// Wraps `chan`.
    pub fn new(chan: Channel) -> Receiver {
        let (max_frame, fds) = (chan.config().max_frame(), chan.config().fds());
        Receiver {
            chan,
            max_frame,
            fds,
            ended: false,
        }
    }

    fn end(&mut self, e: Error) {
        assert!(e.is_hosing(), "a receive error that is not hosing: {e:?}");
        assert!(
            matches!(self.chan.try_recv(), Err(Error::Hosed)),
            "{e:?} reported twice"
        );
        assert!(self.chan.is_hosed());
        assert!(
            self.chan.interest().read_fd().is_none(),
            "a hosed channel's interest"
        );
        self.ended = true;
    }
}

impl Turns for Receiver {
    /// `interest`, `on_ready`, then `try_recv` until nothing is left.
    fn turn(&mut self) -> bool {
        if self.ended {
            return false;
        }
        let _ = self.chan.interest();
        if let Err(e) = self.chan.on_ready() {
            self.end(e);
            return true;
        }
        let mut any = false;
        loop {
            match self.chan.try_recv() {
                Ok(Some(f)) => {
                    assert!(
                        f.payload.len() as u64 <= self.max_frame,
                        "a frame over max_frame"
                    );
                    assert!(f.fd.is_none() || self.fds, "an fd on a channel without fds");
                    any = true;
                }
                Ok(None) => return any,
                Err(e) => {
                    self.end(e);
                    return true;
                }
            }
        }
    }

    /// Hosed once, or the peer's graceful end (an ordinary outcome, not an error: the
    /// channel answers `Ok(None)` from then on and says `is_peer_ended`).
    fn ended(&self) -> bool {
        self.ended || self.chan.is_peer_ended()
    }

    fn read_fd(&self) -> Option<BorrowedFd<'_>> {
        self.chan.interest().read_fd()
    }
}

/// Writes all of `bytes` through the peer, turning the receiver while the carrier is full;
/// gives up when neither side moves.
pub fn feed(peer: &mut RawPeer, rx: &mut Receiver, bytes: &[u8]) {
    let mut rest = bytes;
    let mut stalls = 0;
    while !rest.is_empty() && stalls < 3 {
        let n = peer.write(rest);
        rest = &rest[n..];
        let moved = rx.turn();
        stalls = if n == 0 && !moved { stalls + 1 } else { 0 };
    }
}

/// The channel configuration and the peer the setup byte picks: kind (bits 0-1), fds off (bit
/// 2), the peer's hello (bit 3: with a side socket; bit 4: raw, from the input's first write),
/// a small `max_frame` (bit 5), a small queue message size (bit 6).
fn setup(b: u8) -> (Channel, RawPeer) {
    let kind = [
        ChannelKind::SocketStream,
        ChannelKind::ShmQueue,
        ChannelKind::PosixMq,
        ChannelKind::SocketStream,
    ][usize::from(b & 3)];
    let side = b & 8 != 0;
    let hello = if b & 16 != 0 {
        Hello::Raw { side }
    } else {
        Hello::Proper { side }
    };
    let cfg = ChannelConfig::new()
        .with_kind(kind)
        .with_fds(b & 4 == 0)
        .with_max_frame(if b & 32 != 0 { 4096 } else { 1 << 20 })
        .with_ring_capacity(4096);
    let (mine, theirs) = UnixStream::pair().expect("socketpair");
    let chan = Channel::from_stream(mine, cfg).expect("a channel");
    let msgsize = if b & 64 != 0 { 16 } else { 2048 };
    (chan, RawPeer::new(theirs, kind, hello, msgsize))
}

/// Operations of both targets' programs.
const OP_WRITE: u8 = 0;
const OP_PUMP: u8 = 1;
const OP_SIDE: u8 = 2;
const OP_CLOSE_SIDE: u8 = 3;
const OP_TAIL: u8 = 4;
const OP_FRAME: u8 = 5;
const OP_SHUTDOWN: u8 = 6;
const OPS: u8 = 7;

/// One input: a setup byte, then operations until the input ends; then the peer goes away.
fn run(data: &[u8], frames_op: bool) {
    let mut inp = Input::new(data);
    let (chan, mut peer) = setup(inp.u8());
    if frames_op {
        // Fds a raw hello carries beyond those it should (of the kinds the byte picks).
        let extra = inp.u8();
        peer.extra = (0..extra % 4)
            .filter_map(|i| some_fd(extra >> (2 + i)))
            .collect();
    }
    let mut rx = Receiver::new(chan);
    // A raw hello's first write goes first; a proper one goes with the first write.
    while let Some(op) = inp.op(OPS) {
        match op {
            OP_WRITE => {
                let bytes = inp.chunk();
                feed(&mut peer, &mut rx, bytes);
            }
            OP_PUMP => {
                rx.turn();
            }
            OP_SIDE => {
                let n = inp.u8();
                let kind = inp.u8();
                let fds: Vec<OwnedFd> = (0..n % 4).filter_map(|i| some_fd(kind >> i | 1)).collect();
                let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
                peer.side_message(usize::from(n >> 4), &borrowed);
            }
            OP_CLOSE_SIDE => peer.close_side(),
            OP_TAIL => peer.set_tail(inp.u32() as i32 as i64 as u64),
            OP_FRAME if frames_op => {
                // A frame from its parts: flags, a short length (not always the body's), a body.
                let flags = u32::from(inp.u8() & 0x3f);
                let len = u64::from(inp.u8());
                let n = usize::from(inp.u8());
                let body = inp.bytes(n);
                let mut f = header(flags, len).to_vec();
                f.extend_from_slice(body);
                feed(&mut peer, &mut rx, &f);
            }
            OP_SHUTDOWN => peer.shutdown(),
            _ => {}
        }
    }
    rx.turn();
    drop(peer);
    until_end(&mut rx);
}

/// The `transport_frames` target.
pub fn run_frames(data: &[u8]) {
    run(data, false);
}

/// The `transport_fds` target.
pub fn run_fds(data: &[u8]) {
    run(data, true);
}

/// What a real channel writes: its hello, then the stream (frames of several sizes, a
/// gathered one, fds, a ping, a big frame of `big` bytes, the END frame), and how many of its
/// frames carry an fd.
pub fn real_stream(big: usize) -> (Vec<u8>, Vec<u8>, usize) {
    let cfg = ChannelConfig::new().with_auto_ping(Some(Duration::from_nanos(1)));
    let (mine, theirs) = UnixStream::pair().expect("socketpair");
    let mut a = Channel::from_stream(mine, cfg).expect("a channel");
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    let mut out = Vec::new();
    let mut fds = Vec::new();
    let mut take = |out: &mut Vec<u8>| {
        let (bytes, f) = crate::drain(&theirs);
        out.extend(bytes);
        fds.extend(f);
    };
    let mut send = |a: &mut Channel, f: OutFrame<'_>, out: &mut Vec<u8>| {
        a.send(f).expect("send");
        // (Flushed in turns: the socket's buffer is smaller than the big frame.)
        while !a.flush().expect("flush") {
            take(out);
        }
        take(out);
    };
    send(&mut a, OutFrame::new(b"hello, peer"), &mut out);
    send(&mut a, OutFrame::new(&[]), &mut out);
    send(&mut a, OutFrame::parts(&[b"two ", b"parts"]), &mut out);
    send(
        &mut a,
        OutFrame::new(b"with an fd").fd(null.as_fd()),
        &mut out,
    );
    a.on_timer(std::time::Instant::now() + Duration::from_secs(1))
        .expect("a ping");
    send(&mut a, OutFrame::new(b"after the ping"), &mut out);
    let big = vec![0x5a; big];
    send(&mut a, OutFrame::new(&big), &mut out);
    send(
        &mut a,
        OutFrame::new(b"after the big one").fd(null.as_fd()),
        &mut out,
    );
    let fd_frames = 2;
    a.end_sending().expect("end");
    assert!(a.flush().expect("flush"), "all written");
    out.extend(crate::drain(&theirs).0);
    let hello = out.drain(..crate::peer::HEADER_LEN).collect();
    (hello, out, fd_frames)
}

/// Seeds of both targets: the real stream for each kind, hello made by the peer or taken from
/// the real channel's bytes.
pub fn seeds(frames_op: bool) -> Vec<Seed> {
    let mut seeds = Vec::new();
    for (big, tag) in [(0, "small"), (80_000, "big")] {
        let (hello, stream, fd_frames) = real_stream(big);
        for (kind, name) in [(0u8, "socket"), (1, "ring"), (2, "mq")] {
            for raw in [false, true] {
                let setup = kind | 8 | if raw { 16 } else { 0 };
                let mut p = Program::new();
                p.u8(setup);
                if frames_op {
                    p.u8(0);
                }
                if raw {
                    // The real hello's bytes (its side socket is attached by the peer).
                    let mut h = hello.clone();
                    h[4] |= [0, 1 << 4, 1 << 5][usize::from(kind)];
                    p.u8(OP_WRITE).chunk(&h);
                }
                for _ in 0..fd_frames {
                    p.u8(OP_SIDE).u8(1).u8(1);
                }
                for c in stream.chunks(60_000) {
                    p.u8(OP_WRITE).chunk(c);
                }
                let file = format!("{tag}-{name}{}", if raw { "-raw" } else { "" });
                seeds.push((file, p.finish()));
            }
        }
    }
    if frames_op {
        // Frames from parts: an fd frame and its side message, a ping, an END.
        let mut p = Program::new();
        p.u8(8).u8(0);
        p.u8(OP_SIDE).u8(1).u8(1);
        p.u8(OP_FRAME).u8(1).u8(3).u8(3).bytes(b"abc");
        p.u8(OP_FRAME).u8(2).u8(0).u8(0);
        p.u8(OP_FRAME).u8(4).u8(0).u8(0);
        seeds.push(("parts".into(), p.finish()));
        // A raw hello with its side socket.
        let mut p = Program::new();
        p.u8(8 | 16).u8(0);
        p.u8(OP_WRITE).chunk(&header(FLAG_HELLO | 1, 0));
        p.u8(OP_FRAME).u8(0).u8(2).u8(2).bytes(b"ok");
        seeds.push(("raw-hello".into(), p.finish()));
    }
    seeds
}
