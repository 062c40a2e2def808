//! Structured dispatch: a real structured channel with expectations (many and one-off), pending
//! requests (one-off and indefinite), a sent notification and both unexpected-response
//! handlers receives the frames a real transport channel sends: messages of every type,
//! responses to good and bad ids, malformed roots, notices; between frames the input may take
//! cached messages or undo expectations. Handlers answer some messages (a send from inside).
//!
//! Oracles: no panic; a handler only gets messages of its type (when the message's root is
//! readable, `which()` agrees with the dispatch, fast path or not); `on_error` fires at most
//! once, exactly once by the end, and every later call answers `Hosed`.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use flowipc::msg::{Backing, MsgIn, SegmentSizes};
use flowipc::poll::Pollable;
use flowipc::schemas::test_msgs_capnp::cool_msg;
use flowipc::struc::{Channel, Error, Expect, MsgType};
use flowipc::transport::{self, ChannelConfig, OutFrame};

use crate::msg_frames::{heap_frame, with_token, TOKEN};
use crate::{until_end, Input, Program, Seed, Turns};

type Chan = Channel<cool_msg::Owned>;

/// The union index of a readable message's root, as capnp's reader says.
fn which(m: &MsgIn<cool_msg::Owned>) -> Option<u16> {
    use cool_msg::Which::*;
    Some(match m.root().ok()?.which().ok()? {
        HelloThere(_) => 0,
        SumRequest(_) => 1,
        SumResponse(_) => 2,
        HitMeWithYourBestShot(_) => 3,
        MyBestShot(_) => 4,
        Blob(_) => 5,
        Ping(()) => 6,
    })
}

/// A handler's check: `m` is of type `t` if capnp can tell.
fn check_type(m: &MsgIn<cool_msg::Owned>, t: u16) {
    if let Some(w) = which(m) {
        assert_eq!(w, t, "a message of type {w} dispatched as type {t}");
    }
    let _ = format!("{m:#}");
}

/// The receiving channel and its handlers' counts.
struct Receiver {
    chan: Chan,
    errors: Arc<AtomicUsize>,
    ended: bool,
}

impl Turns for Receiver {
    fn turn(&mut self) -> bool {
        if self.ended {
            return false;
        }
        let _ = self.chan.interest();
        let before = self.errors.load(Ordering::Relaxed);
        match self.chan.on_ready() {
            Ok(()) => {
                assert_eq!(self.errors.load(Ordering::Relaxed), before);
                false
            }
            Err(e) => {
                assert!(
                    matches!(e, Error::Hosed),
                    "a hosing error not given to on_error: {e}"
                );
                self.end();
                true
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

impl Receiver {
    fn end(&mut self) {
        assert_eq!(self.errors.load(Ordering::Relaxed), 1, "on_error once");
        assert!(matches!(self.chan.process_ready(), Err(Error::Hosed)));
        assert!(self.chan.is_hosed());
        assert_eq!(self.errors.load(Ordering::Relaxed), 1, "on_error once");
        self.ended = true;
    }
}

/// Types by their union index.
fn types() -> [MsgType; 7] {
    [
        "helloThere",
        "sumRequest",
        "sumResponse",
        "hitMeWithYourBestShot",
        "myBestShot",
        "blob",
        "ping",
    ]
    .map(|n| MsgType::of::<cool_msg::Owned>(n).expect("a type"))
}

/// The channel under test: started, its expectations and requests in place (see the module
/// docs). Its own messages have ids 1 (a one-off request), 2 (an indefinite one) and 3 (a
/// notification).
fn receiver(b: transport::Channel, token: bool) -> Receiver {
    let mut chan = Chan::new(b, Backing::Heap).expect("a channel");
    if token {
        chan = chan.with_session_token(TOKEN);
    }
    let t = types();
    let errors = Arc::new(AtomicUsize::new(0));
    let e = errors.clone();
    chan.start(move |_| {
        e.fetch_add(1, Ordering::Relaxed);
    })
    .expect("start");
    // helloThere: many; answers each with a sumResponse (a send from inside a handler).
    chan.expect_msgs(t[0], |c, m| {
        check_type(&m, 0);
        let mut rsp = c.create_msg();
        rsp.init_root().init_sum_response().set_sum(1);
        let _ = c.send(&mut rsp, Some(&m));
    })
    .expect("expect");
    chan.expect_msg(t[1], |_, m| check_type(&m, 1))
        .expect("expect");
    // myBestShot: many, until one undoes it.
    chan.expect_msgs(t[4], move |c, m| {
        check_type(&m, 4);
        let _ = c.undo_expect_msgs(t[4]);
    })
    .expect("expect");
    chan.set_unexpected_response_handler(|_, m| {
        let _ = format!("{m:#}");
    });
    chan.set_remote_unexpected_response_handler(|_, _| {});
    let mut req = chan.create_msg();
    req.init_root().init_hit_me_with_your_best_shot();
    chan.async_request(&mut req, None, Expect::OneOff, |_, m| {
        let _ = format!("{m:#}");
    })
    .expect("a request");
    chan.async_request(&mut req, None, Expect::Indefinite, |_, m| {
        let _ = format!("{m:#}");
    })
    .expect("a request");
    let mut note = chan.create_msg();
    note.init_root().set_ping(());
    chan.send(&mut note, None).expect("a send");
    Receiver {
        chan,
        errors,
        ended: false,
    }
}

const OP_FRAME: u8 = 0;
const OP_TAKE: u8 = 1;
const OP_UNDO: u8 = 2;
const OP_END: u8 = 3;
const OPS: u8 = 4;

/// One input: a setup byte (bit 0: the channel carries the session token [`TOKEN`]), then
/// operations.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let setup = inp.u8();
    let (mut tx, b) = transport::Channel::pair(ChannelConfig::new()).expect("a pair");
    let mut r = receiver(b, setup & 1 != 0);
    let t = types();
    while let Some(op) = inp.op(OPS) {
        match op {
            OP_FRAME => {
                let _ = tx.send(OutFrame::new(inp.chunk()));
                let _ = tx.flush();
            }
            OP_TAKE => {
                let k = usize::from(inp.u8()) % t.len();
                if let Ok(Some(m)) = r.chan.take_cached(t[k]) {
                    check_type(&m, k as u16);
                }
            }
            OP_UNDO => match inp.u8() % 3 {
                0 => drop(r.chan.undo_expect_msgs(t[0])),
                1 => drop(r.chan.undo_expect_responses(flowipc::struc::ReqId(2))),
                _ => r.chan.unset_unexpected_response_handler(),
            },
            OP_END => drop(tx.end_sending()),
            _ => {}
        }
        r.turn();
        // (The channel's own answers are never read: the transport queues what the socket
        // does not take.)
        let _ = tx.try_recv();
    }
    drop(tx);
    until_end(&mut r);
}

/// A real heap frame of the message `build` makes, answering `answers`.
fn frame(answers: u64, build: impl FnOnce(cool_msg::Builder<'_>)) -> Vec<u8> {
    let mut f = heap_frame(SegmentSizes::default(), build);
    f[16..24].copy_from_slice(&answers.to_le_bytes());
    f
}

/// Seeds: a message of every type, responses to each of the channel's requests (and to its
/// notification, and to an id it never used), with and without the session token.
pub fn seeds() -> Vec<Seed> {
    let frames = [
        frame(0, |r| r.init_hello_there().set_num(5)),
        frame(0, |r| r.init_sum_request().set_constant_factor(2)),
        frame(0, |mut r| r.set_ping(())),
        frame(0, |r| r.init_my_best_shot().set_text("shot")),
        frame(0, |r| r.init_my_best_shot().set_num(2)),
        frame(0, |r| r.init_blob().set_tag(1)),
        frame(1, |r| r.init_sum_response().set_sum(1)),
        frame(2, |r| r.init_sum_response().set_sum(2)),
        frame(2, |r| r.init_sum_response().set_sum(3)),
        frame(1, |r| r.init_sum_response().set_sum(4)),
        frame(3, |r| r.init_sum_response().set_sum(5)),
        frame(9, |r| r.init_sum_response().set_sum(6)),
    ];
    let mut seeds = Vec::new();
    for setup in [0u8, 1] {
        let mut p = Program::new();
        p.u8(setup);
        for (i, f) in frames.iter().enumerate() {
            let mut g = with_token(&f[..24], setup << 1);
            g.extend_from_slice(&f[24..]);
            p.u8(OP_FRAME).chunk(&g);
            if i == 3 {
                p.u8(OP_TAKE).u8(6);
            }
        }
        p.u8(OP_END);
        seeds.push((format!("setup{setup}"), p.finish()));
    }
    seeds
}
