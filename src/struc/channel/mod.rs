//! The structured channel's sync_io core: [`Channel`].
//!
//! * `dispatch`: receiving (one step at a time) and dispatching what comes: unsolicited
//!   messages to their expectation or the cache, responses to their request; reporting and
//!   hosing;
//! * `expect`: expectations and requests (`expect_*`, `undo_*`, `take_cached`, the
//!   unexpected-response handlers, `sync_request`, `async_request`) and the small maps they
//!   live in;
//! * this module: the [`Channel`] itself (construction, start, sending, the public poll
//!   surface: `process_ready`, `run_for`, `run`, flushing and timers) and its [`Pollable`] impl.

mod dispatch;
mod expect;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::BuildHasherDefault;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use capnp::traits::Owned;

use self::expect::{ByType, IdHasher, TimedOut};
use super::{root_schema, Error};
use crate::hosing::Hosing;
use crate::msg::{Backing, MsgChannel, MsgIn, MsgOut};
use crate::poll::{Interest, Pollable};
use crate::transport;

/// How long a request's expectation lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Until the first response (later ones are unexpected).
    OneOff,
    /// Until [`undo_expect_responses`](Channel::undo_expect_responses).
    Indefinite,
}

/// Identifies an [`async_request`](Channel::async_request) (its message instance's id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReqId(pub u64);

type Handler<M> = Box<dyn FnMut(&mut Channel<M>, MsgIn<M>) + Send>;

/// A pending async request: how long it lasts, its handler (`None` while it runs), and the
/// responses that came while it ran (a nested receive), delivered right after it returns.
struct Request<M: Owned> {
    expect: Expect,
    handler: Option<Handler<M>>,
    queued: VecDeque<MsgIn<M>>,
}
type OneOff<M> = Box<dyn FnOnce(&mut Channel<M>, MsgIn<M>) + Send>;
type RemoteUnexpected = Box<dyn FnMut(u64, &str) + Send>;
type PeerEnd<M> = Box<dyn FnOnce(&mut Channel<M>) + Send>;

/// A structured channel of root type `M` (see the [module docs](super)).
pub struct Channel<M: Owned> {
    msgs: MsgChannel<M>,
    /// Where the root union's discriminant is (in 16-bit units of the root's data section), and
    /// how many fields the union has.
    union_at: u32,
    union_len: u16,
    started: bool,
    hosing: Hosing,
    on_error: Option<Box<dyn FnOnce(Error) + Send>>,
    expect_one: ByType<OneOff<M>>,
    /// `None` while the handler runs (taken out so it can get `&mut Channel`).
    expect_many: ByType<Option<Handler<M>>>,
    cache: ByType<VecDeque<MsgIn<M>>>,
    /// Pending async requests by id.
    requests: HashMap<u64, Request<M>, BuildHasherDefault<IdHasher>>,
    /// Requests that `sync_request` calls (possibly nested, so usually one) wait on.
    sync_waiting: Vec<u64>,
    /// Their responses, once here (kept apart from the ids so that a message is moved as
    /// little as possible: in here, and out to its caller).
    sync_arrived: Vec<(u64, MsgIn<M>)>,
    /// Requests whose `sync_request` timed out: their late responses are dropped quietly.
    timed_out: TimedOut,
    on_unexpected: Option<Handler<M>>,
    on_remote_unexpected: Option<RemoteUnexpected>,
    /// The peer ended its sending, and everything it sent before has been dispatched.
    peer_ended: bool,
    on_peer_end: Option<PeerEnd<M>>,
}

impl<M: Owned> fmt::Debug for Channel<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("struc::Channel")
            .field("msgs", &self.msgs)
            .field("started", &self.started)
            .field("hosed", &self.hosing.is_hosed())
            .field("peer_ended", &self.peer_ended)
            .field("pending_requests", &self.requests.len())
            .field(
                "cached",
                &self
                    .cache
                    .0
                    .iter()
                    .flatten()
                    .map(VecDeque::len)
                    .sum::<usize>(),
            )
            .finish()
    }
}

impl<M: Owned> Channel<M> {
    /// Takes over an unstructured channel; new messages use `backing`. Fails with
    /// [`Error::NoRootUnion`] if `M` has no anonymous union at its root.
    pub fn new(chan: transport::Channel, backing: Backing) -> Result<Self, Error> {
        Self::from_msg_channel(MsgChannel::new(chan, backing))
    }

    /// Takes over a message channel (e.g. one made
    /// [`with_session_token`](MsgChannel::with_session_token)). Fails like
    /// [`new`](Channel::new).
    pub fn from_msg_channel(msgs: MsgChannel<M>) -> Result<Self, Error> {
        let (union_at, union_len) = match root_schema::<M>()?.get_proto().which() {
            Ok(capnp::schema_capnp::node::Struct(st)) => {
                (st.get_discriminant_offset(), st.get_discriminant_count())
            }
            _ => return Err(Error::NoRootUnion),
        };
        Ok(Channel {
            msgs,
            union_at,
            union_len,
            started: false,
            hosing: Hosing::default(),
            on_error: None,
            expect_one: ByType::default(),
            expect_many: ByType::default(),
            cache: ByType::default(),
            requests: HashMap::default(),
            sync_waiting: Vec::new(),
            sync_arrived: Vec::new(),
            timed_out: TimedOut::default(),
            on_unexpected: None,
            on_remote_unexpected: None,
            peer_ended: false,
            on_peer_end: None,
        })
    }

    /// Makes every message carry a session's `token` and refuses the peer's messages that
    /// carry another or none (see [`MsgChannel::with_session_token`]).
    pub fn with_session_token(mut self, token: u128) -> Self {
        self.msgs.set_session_token(token);
        self
    }

    /// The session token messages carry, if any.
    pub fn session_token(&self) -> Option<u128> {
        self.msgs.session_token()
    }

    /// A new, empty message with the channel's backing.
    pub fn create_msg(&self) -> MsgOut<M> {
        self.msgs.create_msg()
    }

    /// A new, empty message paired with `fd` (see [`MsgOut::set_fd`]).
    pub fn create_msg_with_fd(&self, fd: std::os::fd::OwnedFd) -> MsgOut<M> {
        let mut m = self.msgs.create_msg();
        m.set_fd(fd);
        m
    }

    /// Starts receiving. Before this, sends work and expectations may be registered, but
    /// nothing is received. `on_error` gets the hosing error if it happens while receiving (an
    /// error hit by a call is returned by that call instead): at most once.
    pub fn start(&mut self, on_error: impl FnOnce(Error) + Send + 'static) -> Result<(), Error> {
        self.check()?;
        if self.started {
            return Err(Error::AlreadyStarted);
        }
        self.started = true;
        self.on_error = Some(Box::new(on_error));
        Ok(())
    }

    /// [`start`](Channel::start), then handle whatever has already arrived
    /// ([`process_ready`](Channel::process_ready)): for a poll loop that may have missed a
    /// readiness edge before starting.
    pub fn start_and_poll(
        &mut self,
        on_error: impl FnOnce(Error) + Send + 'static,
    ) -> Result<(), Error> {
        self.start(on_error)?;
        self.process_ready()
    }

    /// Whether a hosing error has been reported.
    pub fn is_hosed(&self) -> bool {
        self.hosing.is_hosed()
    }

    /// Whether [`start`](Channel::start) was called.
    pub fn is_started(&self) -> bool {
        self.started
    }

    fn check(&self) -> Result<(), Error> {
        self.hosing.check()
    }

    /// [`check`](Self::check), and that receiving has started.
    fn check_started(&self) -> Result<(), Error> {
        self.check()?;
        if self.started {
            Ok(())
        } else {
            Err(Error::NotStarted)
        }
    }

    /// Sends a notification, or a response if `originating` is the message it answers.
    pub fn send(
        &mut self,
        msg: &mut MsgOut<M>,
        originating: Option<&MsgIn<M>>,
    ) -> Result<(), Error> {
        self.send_with_fd(msg, originating, None).map(|_| ())
    }

    /// [`send`](Channel::send) with an fd riding along (the receiver gets its own copy).
    pub fn send_with_fd(
        &mut self,
        msg: &mut MsgOut<M>,
        originating: Option<&MsgIn<M>>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<u64, Error> {
        self.check()?;
        let answers = originating.map_or(0, MsgIn::id);
        match self.msgs.send_answering(msg, fd, answers) {
            Ok(id) => Ok(id),
            Err(e) => Err(self.hose(e.into())),
        }
    }

    /// Stops receiving until the next [`start`](Channel::start) (what arrives meanwhile waits in
    /// the socket): a session hands its log-in channel over to an `AsyncChannel` this way.
    pub(crate) fn pause(&mut self) {
        self.started = false;
        self.on_error = None;
    }

    /// Handles every message that has arrived, without waiting (call it when the fd is
    /// readable). A hosing error goes to the `on_error` handler and is returned as
    /// [`Error::Hosed`] (reported once, there).
    pub fn process_ready(&mut self) -> Result<(), Error> {
        self.check_started()?;
        loop {
            match self.step_inner(Some(Duration::ZERO)) {
                Ok(true) => continue,
                Ok(false) => return Ok(()),
                Err(e) => return Err(self.report(e)),
            }
        }
    }

    /// Its transport's keep-alive: `(auto_ping, idle_timeout)` (see
    /// [`transport::Channel::keep_alive`]).
    pub fn keep_alive(&self) -> (Option<Duration>, Option<Duration>) {
        self.msgs.channel_ref().keep_alive()
    }

    /// Changes its transport's keep-alive (see [`transport::Channel::set_keep_alive`]): a
    /// peer silent for `idle_timeout` then hoses the channel with the transport's
    /// [`IdleTimeout`](transport::Error::IdleTimeout), reported once.
    pub fn set_keep_alive(&mut self, auto_ping: Option<Duration>, idle_timeout: Option<Duration>) {
        self.msgs.channel().set_keep_alive(auto_ping, idle_timeout)
    }

    /// Receives and dispatches the next event that has arrived, if any, without waiting:
    /// `Ok(false)` if none had (for callers that look for what an event brought after each
    /// one, before reading on to a close behind it). Hosing errors are returned (not given to `on_error`).
    pub(crate) fn step_ready(&mut self) -> Result<bool, Error> {
        self.check_started()?;
        self.step(Some(Duration::ZERO))
    }

    /// Waits for and handles messages for `duration` (a blocking user's event loop); returns
    /// early, `Ok`, once the peer has ended its sending (nothing more can come).
    pub fn run_for(&mut self, duration: Duration) -> Result<(), Error> {
        self.check_started()?;
        let deadline = Instant::now() + duration;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.peer_ended {
                return Ok(());
            }
            if let Err(e) = self.step_inner(Some(left)) {
                return Err(self.report(e));
            }
        }
    }

    /// Ends sending gracefully: everything sent so far goes out, then the peer learns of the
    /// end (its [`is_peer_ended`](Channel::is_peer_ended) turns true and its peer-end handler
    /// runs, after every message sent before: no error on its side). Later sends fail with the
    /// transport's `SendingEnded`; receiving goes on. [`is_send_done`](Channel::is_send_done)
    /// tells when it is all written; [`flush`](Channel::flush) pushes it along, and
    /// [`end_sending_blocking`](Channel::end_sending_blocking) waits for it.
    pub fn end_sending(&mut self) -> Result<(), Error> {
        self.check()?;
        match self.msgs.channel().end_sending() {
            Ok(()) => Ok(()),
            Err(e) => Err(self.hose(e.into())),
        }
    }

    /// [`end_sending`](Channel::end_sending) (unless called before), then waits up to
    /// `timeout` (`None`: no limit) until the end and everything before it are written:
    /// `Ok(true)` then, `Ok(false)` at the timeout (the rest stays queued: call again, or
    /// [`flush`](Channel::flush)). It does not receive meanwhile (a peer blocked sending to
    /// this side while its own socket is full would wait too: run the poll loop instead).
    pub fn end_sending_blocking(&mut self, timeout: Option<Duration>) -> Result<bool, Error> {
        self.check()?;
        match self.msgs.channel().end_sending_blocking(timeout) {
            Ok(done) => Ok(done),
            Err(e) => Err(self.hose(e.into())),
        }
    }

    /// Whether the peer ended its sending (its [`end_sending`](Channel::end_sending)) and
    /// every message it sent before has been dispatched: the graceful end, not an error. Nothing
    /// more will be received ([`run`](Channel::run) returns `Ok`, the fd is no longer watched
    /// for reading); requests still waiting for a response fail with [`Error::PeerEnded`] (a
    /// `sync_request`) or are dropped (an `async_request`'s handler); sending goes on.
    pub fn is_peer_ended(&self) -> bool {
        self.peer_ended
    }

    /// Sets the handler of the peer's graceful end: it runs once, inside the receive that meets
    /// the end (after every message sent before it was dispatched), with the channel to answer
    /// or end its own sending. If the peer has ended already, it runs at once, inside this
    /// call. Never called for a hosing error (that goes to `on_error`).
    pub fn set_peer_end_handler(&mut self, handler: impl FnOnce(&mut Channel<M>) + Send + 'static) {
        if self.peer_ended {
            handler(self);
        } else {
            self.on_peer_end = Some(Box::new(handler));
        }
    }

    /// Whether the end of sending (and everything before it) has been written.
    pub fn is_send_done(&mut self) -> bool {
        self.msgs.channel().is_send_done()
    }

    /// Writes what the socket takes of the send queue; `Ok(true)` when it is empty. (Blocking
    /// receives flush by themselves; a poll loop calls this when the fd is writable.)
    pub fn flush(&mut self) -> Result<bool, Error> {
        self.check()?;
        match self.msgs.channel().flush() {
            Ok(done) => Ok(done),
            Err(e) => Err(self.hose(e.into())),
        }
    }

    /// When [`on_timer`](Channel::on_timer) should run next (keep-alive ping or idle timeout of
    /// the transport's [`ChannelConfig`](transport::ChannelConfig)); `None`: no timer.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        if self.hosing.is_hosed() {
            return None;
        }
        self.msgs.channel().next_deadline()
    }

    /// Sends a keep-alive ping if one is due and checks the idle timeout. A hosing error (the
    /// transport's `IdleTimeout`) goes to `on_error` and is returned as [`Error::Hosed`], as
    /// with [`process_ready`](Channel::process_ready).
    pub fn on_timer(&mut self) -> Result<(), Error> {
        self.check()?;
        match self.msgs.channel().on_timer(Instant::now()) {
            Ok(()) => Ok(()),
            // `report` hands back a non-hosing error as it is.
            Err(e) => Err(self.report(e.into())),
        }
    }

    /// Whether the send queue holds bytes (the [`interest`](Pollable::interest) then has an
    /// fd to watch for writing; [`flush`](Channel::flush) writes).
    pub fn wants_write(&mut self) -> bool {
        self.msgs.channel().wants_write()
    }

    /// Handles messages until the peer ends its sending (`Ok`: the graceful end, see
    /// [`is_peer_ended`](Channel::is_peer_ended)) or the channel is hosed (that error, returned
    /// the way [`process_ready`](Channel::process_ready) does): a server's loop. Each wait is
    /// one blocking receive.
    pub fn run(&mut self) -> Result<(), Error> {
        self.check_started()?;
        loop {
            if self.peer_ended {
                return Ok(());
            }
            if let Err(e) = self.step_inner(None) {
                return Err(self.report(e));
            }
        }
    }
}

impl<M: Owned> Pollable for Channel<M> {
    type Error = Error;

    /// The transport's, except that the socket is watched for reading only once
    /// [`start`](Channel::start)ed; nothing once hosed.
    fn interest(&self) -> Interest<'_> {
        if self.hosing.is_hosed() {
            return Interest::none();
        }
        let i = self.msgs.interest();
        if self.started {
            i
        } else {
            Interest::new(None, i.write_fd(), i.deadline())
        }
    }

    /// Writes what the socket takes, runs the timers and, once started, receives and
    /// dispatches what has arrived ([`process_ready`](Channel::process_ready)). A hosing error
    /// goes to `on_error` and is returned as [`Error::Hosed`], as with `process_ready`.
    fn on_ready(&mut self) -> Result<(), Error> {
        self.check()?;
        if let Err(e) = self.msgs.on_ready() {
            return Err(self.report(e.into()));
        }
        if self.started {
            self.process_ready()?;
        }
        Ok(())
    }
}

impl<M: Owned> AsFd for Channel<M> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.msgs.as_fd()
    }
}

impl<M: Owned> AsRawFd for Channel<M> {
    fn as_raw_fd(&self) -> RawFd {
        self.msgs.as_raw_fd()
    }
}
