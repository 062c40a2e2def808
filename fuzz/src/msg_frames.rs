//! The message layer's parsers: a real [`MsgChannel`] receives frames a real transport channel
//! sends: message headers (kind, flags, ids, the session token), heap messages (capnp's
//! segment table and segments), pool announcements (with the arena's pool fd or another), and
//! in-place messages whose lend blob is a real one with the input's bits flipped. Every
//! message received is read in full (its text rendering walks every pointer).
//!
//! Oracles: no panic; an error is hosing and reported once; an in-place message reads as one
//! of the fixture's messages; the fixture's reference counts are back to where they were once
//! the channel is gone (see [`fixture`](crate::fixture)).

use std::os::fd::{BorrowedFd, OwnedFd};

use flowipc::msg::{Backing, Error, MsgChannel, MsgIn, MsgOut, SegmentSizes};
use flowipc::poll::Pollable;
use flowipc::schemas::test_msgs_capnp::cool_msg;
use flowipc::transport::{Channel, ChannelConfig, OutFrame};

use crate::fixture::{self, Fixture, MSG_HEADER_LEN};
use crate::{some_fd, until_end, Input, Program, Seed, Turns};

/// The session token of the receivers that expect one.
pub const TOKEN: u128 = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;

/// The receiving message channel.
struct Receiver<'a> {
    rx: MsgChannel<cool_msg::Owned>,
    texts: &'a [String; 2],
    ended: bool,
}

/// Reads all of a received message; an in-place one must be one of `texts` (if given).
pub fn read_all(mut m: MsgIn<cool_msg::Owned>, texts: Option<&[String]>) {
    let text = format!("{m:#}");
    let _ = m.segments();
    let _ = m.take_fd();
    if let (true, Some(texts)) = (m.is_zero_copy(), texts) {
        assert!(
            texts.contains(&text),
            "an in-place message that is none of the fixture's: {text}"
        );
        assert!(m.shared_refs().unwrap_or(0) >= 1);
    }
}

impl Turns for Receiver<'_> {
    fn turn(&mut self) -> bool {
        if self.ended {
            return false;
        }
        let _ = self.rx.interest();
        let mut any = false;
        let err = match self.rx.on_ready() {
            Err(e) => e,
            Ok(()) => loop {
                match self.rx.try_recv() {
                    Ok(Some(m)) => {
                        read_all(m, Some(self.texts));
                        any = true;
                    }
                    Ok(None) => return any,
                    Err(e) => break e,
                }
            },
        };
        assert!(
            err.is_hosing(),
            "a receive error that is not hosing: {err:?}"
        );
        assert!(
            matches!(self.rx.try_recv(), Err(Error::Hosed)),
            "{err:?} twice"
        );
        self.ended = true;
        true
    }

    /// Hosed once, or the peer's graceful end (an ordinary outcome, not an error: the
    /// channel answers `Ok(None)` from then on and says `is_peer_ended`).
    fn ended(&self) -> bool {
        self.ended || self.rx.is_peer_ended()
    }

    fn read_fd(&self) -> Option<BorrowedFd<'_>> {
        self.rx.interest().read_fd()
    }
}

const OP_FRAME: u8 = 0;
const OP_SHM: u8 = 1;
const OP_POOL: u8 = 2;
const OP_TURN: u8 = 3;
const OP_END: u8 = 4;
const OPS: u8 = 5;

/// Sends a frame (refusals, say after the end, are the sender's business) and writes it out.
fn send(tx: &mut Channel, payload: &[u8], fd: Option<OwnedFd>) {
    let _ = tx.send(OutFrame::new(payload).owned_fd(fd));
    let _ = tx.flush();
}

/// `a` with `mask` xor-ed in.
fn flip(a: &[u8], mask: &[u8]) -> Vec<u8> {
    a.iter()
        .zip(mask.iter().chain(std::iter::repeat(&0)))
        .map(|(a, b)| a ^ b)
        .collect()
}

/// One input: a setup byte (bit 0: the receiver knows the arena; bit 1: it expects the session
/// token [`TOKEN`]; bit 2: no fds), then operations.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let setup = inp.u8();
    fixture::with(|fx| {
        let cfg = ChannelConfig::new().with_fds(setup & 4 == 0);
        let (mut tx, b) = Channel::pair(cfg).expect("a pair");
        let mut rx = MsgChannel::new(b, Backing::Heap);
        if setup & 1 != 0 {
            rx = rx.with_arena(&fx.arena);
        }
        if setup & 2 != 0 {
            rx = rx.with_session_token(TOKEN);
        }
        let texts = fx.texts.clone();
        let mut r = Receiver {
            rx,
            texts: &texts,
            ended: false,
        };
        while let Some(op) = inp.op(OPS) {
            match op {
                OP_FRAME => {
                    let fd = some_fd(inp.u8());
                    send(&mut tx, inp.chunk(), fd);
                }
                OP_SHM => {
                    let k = usize::from(inp.u8());
                    let head = inp.chunk();
                    let mask: [u8; 32] = inp.array();
                    let fd = some_fd(inp.u8());
                    let blob = if k & 2 == 0 {
                        fx.lend_msg(k & 1).0
                    } else {
                        fx.lend_obj(k & 1)
                    };
                    let mut f = head.to_vec();
                    f.extend(flip(blob.as_bytes(), &mask));
                    send(&mut tx, &f, fd);
                }
                OP_POOL => {
                    let head = inp.chunk();
                    let mask: [u8; 16] = inp.array();
                    let which = inp.u8();
                    let mut f = head.to_vec();
                    f.extend(flip(&fx.lender.pool_frame[MSG_HEADER_LEN..], &mask));
                    let fd = if which.is_multiple_of(4) {
                        pool_fd(fx)
                    } else {
                        some_fd(which)
                    };
                    send(&mut tx, &f, fd);
                }
                OP_TURN => {}
                OP_END => {
                    let _ = tx.end_sending();
                }
                _ => {}
            }
            r.turn();
        }
        drop(tx);
        until_end(&mut r);
        drop(r);
        fx.settle();
    });
}

/// A duplicate of the fixture arena's pool 0 fd.
fn pool_fd(fx: &Fixture) -> Option<OwnedFd> {
    fx.arena.pool_fd(0)?.try_clone_to_owned().ok()
}

/// A frame's header as the receiver with `setup` expects it: the real header, with the token
/// flag and the token after it when the setup asks for one.
pub fn with_token(frame_head: &[u8], setup: u8) -> Vec<u8> {
    let mut h = frame_head.to_vec();
    if setup & 2 != 0 {
        h[1] |= 1;
        h.extend_from_slice(&TOKEN.to_le_bytes());
    }
    h
}

/// The frame payload a real heap sender writes for the message `build` makes (of root
/// `CoolMsg`, sizes as given).
pub fn heap_frame(sizes: SegmentSizes, build: impl FnOnce(cool_msg::Builder<'_>)) -> Vec<u8> {
    let (a, mut b) = Channel::pair(ChannelConfig::new()).expect("a pair");
    let mut tx = MsgChannel::<cool_msg::Owned>::new(a, Backing::Heap);
    let mut m = MsgOut::<cool_msg::Owned>::with_sizes(None, sizes);
    build(m.init_root());
    tx.send(&mut m, None).expect("a send");
    b.try_recv()
        .expect("a frame")
        .expect("sent")
        .payload
        .to_vec()
}

/// Real frames of heap messages: one-segment ones, and one of several segments.
pub fn heap_frames() -> Vec<Vec<u8>> {
    let d = SegmentSizes::default();
    vec![
        heap_frame(d, |r| r.init_hello_there().set_greeting("hi")),
        heap_frame(d, |r| {
            let mut s = r.init_sum_request();
            s.set_constant_factor(3);
            let mut t = s.init_terms_to_add(3);
            for i in 0..3 {
                t.set(i, i64::from(i) - 1);
            }
        }),
        // Several segments: a message that outgrows a small first segment.
        heap_frame(
            SegmentSizes {
                first_words: 8,
                max_growth_words: 16,
            },
            |r| {
                let mut c = r.init_blob().init_chunks(3);
                for i in 0..3 {
                    c.reborrow().get(i).set_data(&[7; 40]);
                }
            },
        ),
    ]
}

/// Seeds: heap messages, in-place messages (both fixture messages), a pool announcement with
/// the pool's fd, each with and without a session token.
pub fn seeds() -> Vec<Seed> {
    let heap = heap_frames();
    fixture::with(|fx| {
        let mut seeds = Vec::new();
        for setup in [0u8, 1, 2, 3] {
            let mut p = Program::new();
            p.u8(setup);
            for f in &heap {
                let mut g = with_token(&f[..MSG_HEADER_LEN], setup);
                g.extend_from_slice(&f[MSG_HEADER_LEN..]);
                p.u8(OP_FRAME).u8(0).chunk(&g);
            }
            if setup & 1 == 0 {
                // The pool announcement first (the receiver joins the arena with it).
                let head = with_token(&fx.lender.pool_frame[..MSG_HEADER_LEN], setup);
                p.u8(OP_POOL).chunk(&head).bytes(&[0; 16]).u8(0);
            }
            for k in 0..2u8 {
                let head = with_token(&fx.frames[usize::from(k)][..MSG_HEADER_LEN], setup);
                p.u8(OP_SHM).u8(k).chunk(&head).bytes(&[0; 32]).u8(0);
            }
            p.u8(OP_END);
            seeds.push((format!("setup{setup}"), p.finish()));
        }
        seeds
    })
}
