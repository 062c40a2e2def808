//! The structured channel's sync_io core.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use capnp::dynamic_struct;
use capnp::dynamic_value;
use capnp::introspect::Introspect;
use capnp::traits::Owned;

use super::{root_schema, Error, MsgType};
use crate::msg::channel::Incoming;
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

/// A structured channel of root type `M` (see the [module docs](super)).
pub struct Channel<M: Owned> {
    msgs: MsgChannel<M>,
    /// Where the root union's discriminant is (in 16-bit units of the root's data section), and
    /// how many fields the union has.
    union_at: u32,
    union_len: u16,
    started: bool,
    hosed: bool,
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
    on_remote_unexpected: Option<Box<dyn FnMut(u64) + Send>>,
}

impl<M: Owned> fmt::Debug for Channel<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("struc::Channel")
            .field("msgs", &self.msgs)
            .field("started", &self.started)
            .field("hosed", &self.hosed)
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

impl<M> Channel<M>
where
    M: Owned + Introspect,
    for<'a> M::Reader<'a>: Into<dynamic_value::Reader<'a>>,
{
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
            hosed: false,
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
        self.hosed
    }

    /// Whether [`start`](Channel::start) was called.
    pub fn is_started(&self) -> bool {
        self.started
    }

    fn check(&self) -> Result<(), Error> {
        if self.hosed {
            Err(Error::Hosed)
        } else {
            Ok(())
        }
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

    /// Marks the channel hosed if `e` hoses it; returns `e` for the caller to report.
    fn hose(&mut self, e: Error) -> Error {
        if e.is_hosing() {
            self.hosed = true;
            self.on_error = None;
            self.expect_one.clear();
            self.expect_many.clear();
            self.requests.clear();
            self.sync_waiting.clear();
            self.sync_arrived.clear();
            self.on_unexpected = None;
            self.on_remote_unexpected = None;
        }
        e
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

    /// Sends a request and blocks for its one response (up to `timeout`; `None`: no limit),
    /// handling other incoming messages meanwhile. [`Error::Timeout`] is not hosing; a response
    /// arriving later is dropped quietly (not an unexpected response).
    pub fn sync_request(
        &mut self,
        msg: &mut MsgOut<M>,
        originating: Option<&MsgIn<M>>,
        timeout: Option<Duration>,
    ) -> Result<MsgIn<M>, Error> {
        self.check_started()?;
        let deadline = timeout.map(|t| Instant::now() + t);
        let id = self.send_with_fd(msg, originating, None)?;
        self.sync_waiting.push(id);
        let r = loop {
            if let Some(i) = self.sync_arrived.iter().position(|(a, _)| *a == id) {
                break Ok(self.sync_arrived.swap_remove(i).1);
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => {
                        self.timed_out.insert(id);
                        break Err(Error::Timeout);
                    }
                },
                None => None,
            };
            if let Err(e) = self.step(left) {
                if !e.is_hosing() {
                    self.timed_out.insert(id);
                }
                break Err(e);
            }
        };
        if let Some(i) = self.sync_waiting.iter().rposition(|&w| w == id) {
            self.sync_waiting.swap_remove(i);
        }
        // A response that came but was not taken (the wait ended with an error meanwhile).
        self.sync_arrived.retain(|(a, _)| *a != id);
        r
    }

    /// Sends a request; `handler` gets its response(s): the first only ([`Expect::OneOff`]) or
    /// every one until [`undo_expect_responses`](Channel::undo_expect_responses).
    pub fn async_request(
        &mut self,
        msg: &mut MsgOut<M>,
        originating: Option<&MsgIn<M>>,
        expect: Expect,
        handler: impl FnMut(&mut Channel<M>, MsgIn<M>) + Send + 'static,
    ) -> Result<ReqId, Error> {
        let id = self.send_with_fd(msg, originating, None)?;
        self.requests.insert(
            id,
            Request {
                expect,
                handler: Some(Box::new(handler)),
                queued: VecDeque::new(),
            },
        );
        Ok(ReqId(id))
    }

    /// Stops expecting responses to `req`; later ones are unexpected. Returns whether it was
    /// expected.
    pub fn undo_expect_responses(&mut self, req: ReqId) -> Result<bool, Error> {
        self.check()?;
        Ok(self.requests.remove(&req.0).is_some())
    }

    /// Expects one unsolicited message of type `which`. A cached one is handed to `handler` at
    /// once (inside this call). Returns `Ok(false)`, registering nothing, if `which` is already
    /// expected.
    pub fn expect_msg(
        &mut self,
        which: MsgType,
        handler: impl FnOnce(&mut Channel<M>, MsgIn<M>) + Send + 'static,
    ) -> Result<bool, Error> {
        self.check()?;
        if self.is_expected(which) {
            return Ok(false);
        }
        if let Some(m) = self.cache.get_mut(&which.0).and_then(VecDeque::pop_front) {
            handler(self, m);
        } else {
            self.expect_one.insert(which.0, Box::new(handler));
        }
        Ok(true)
    }

    /// Expects every unsolicited message of type `which` until
    /// [`undo_expect_msgs`](Channel::undo_expect_msgs). Cached ones are handed to `handler` at
    /// once, in the order they were sent. `Ok(false)` if `which` is already expected.
    pub fn expect_msgs(
        &mut self,
        which: MsgType,
        handler: impl FnMut(&mut Channel<M>, MsgIn<M>) + Send + 'static,
    ) -> Result<bool, Error> {
        self.check()?;
        if self.is_expected(which) {
            return Ok(false);
        }
        let mut handler: Handler<M> = Box::new(handler);
        // Registered as running (None) while the cache drains, so that a handler calling
        // `undo_expect_msgs` on its own type stops the rest.
        self.expect_many.insert(which.0, None);
        while let Some(m) = self.cache.get_mut(&which.0).and_then(VecDeque::pop_front) {
            handler(self, m);
            if self.hosed || !self.expect_many.contains_key(&which.0) {
                return Ok(true);
            }
        }
        if let Some(slot @ None) = self.expect_many.get_mut(&which.0) {
            *slot = Some(handler);
        }
        Ok(true)
    }

    /// Stops [`expect_msgs`](Channel::expect_msgs) for `which`; later ones are cached again.
    /// Returns whether it was expected.
    pub fn undo_expect_msgs(&mut self, which: MsgType) -> Result<bool, Error> {
        self.check()?;
        Ok(self.expect_many.remove(&which.0).is_some())
    }

    fn is_expected(&self, which: MsgType) -> bool {
        self.expect_one.contains_key(&which.0) || self.expect_many.contains_key(&which.0)
    }

    /// The sync_io way to expect one message: the oldest cached message of type `which`, if
    /// any, handed back directly (no handler); `None` if none is cached (then register with
    /// [`expect_msg`](Channel::expect_msg) to get the next one).
    pub fn take_cached(&mut self, which: MsgType) -> Result<Option<MsgIn<M>>, Error> {
        self.check()?;
        Ok(self.cache.get_mut(&which.0).and_then(VecDeque::pop_front))
    }

    /// Messages of type `which` waiting in the cache.
    pub fn cached(&self, which: MsgType) -> usize {
        self.cache.get(&which.0).map_or(0, VecDeque::len)
    }

    /// Called with each response nothing expected (after it is dropped from dispatch).
    pub fn set_unexpected_response_handler(
        &mut self,
        handler: impl FnMut(&mut Channel<M>, MsgIn<M>) + Send + 'static,
    ) {
        self.on_unexpected = Some(Box::new(handler));
    }

    /// Called with the id of each of our messages that the peer received as an unexpected
    /// response.
    pub fn set_remote_unexpected_response_handler(
        &mut self,
        handler: impl FnMut(u64) + Send + 'static,
    ) {
        self.on_remote_unexpected = Some(Box::new(handler));
    }

    /// Removes the unexpected-response handler (unexpected responses are then only dropped and
    /// reported to the sender).
    pub fn unset_unexpected_response_handler(&mut self) {
        self.on_unexpected = None;
    }

    /// Removes the remote-unexpected-response handler.
    pub fn unset_remote_unexpected_response_handler(&mut self) {
        self.on_remote_unexpected = None;
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

    /// [`process_ready`](Channel::process_ready) for a caller that handles a hosing error
    /// itself: it is returned (once; `Hosed` after), not handed to `on_error`.
    pub(crate) fn process_ready_returning(&mut self) -> Result<(), Error> {
        self.check_started()?;
        while self.step(Some(Duration::ZERO))? {}
        Ok(())
    }

    /// Waits for and handles messages for `duration` (a blocking user's event loop).
    pub fn run_for(&mut self, duration: Duration) -> Result<(), Error> {
        self.check_started()?;
        let deadline = Instant::now() + duration;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            if let Err(e) = self.step_inner(Some(left)) {
                return Err(self.report(e));
            }
        }
    }

    /// Ends sending gracefully: everything sent so far goes out, then the peer learns of the
    /// end ([`transport::Error::EndOfStream`], hosing on its side, reported once). Later sends
    /// fail with the transport's `SendingEnded`. [`is_send_done`](Channel::is_send_done) tells
    /// when it is all written; [`flush`](Channel::flush) pushes it along.
    pub fn end_sending(&mut self) -> Result<(), Error> {
        self.check()?;
        match self.msgs.channel().end_sending() {
            Ok(()) => Ok(()),
            Err(e) => Err(self.hose(e.into())),
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
        if self.hosed {
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

    /// Whether the send queue holds bytes (poll [`write_fd`](Channel::write_fd) for
    /// writability, then [`flush`](Channel::flush)).
    pub fn wants_write(&mut self) -> bool {
        self.msgs.channel().wants_write()
    }

    /// The fd to poll for writability while [`wants_write`](Channel::wants_write): the
    /// socket ([`as_fd`](AsFd::as_fd)), or the transport's fd side socket while that has no
    /// room for the next frame's fd (see [`transport::Channel::write_fd`]).
    pub fn write_fd(&self) -> BorrowedFd<'_> {
        self.msgs.write_fd()
    }

    /// Stops expecting responses to `req` like
    /// [`undo_expect_responses`](Channel::undo_expect_responses), and drops any that still
    /// arrive quietly (for a request whose waiter gave up: not unexpected responses).
    pub(crate) fn abandon_request(&mut self, req: ReqId) {
        self.requests.remove(&req.0);
        self.timed_out.insert(req.0);
    }

    /// Handles messages until the channel is hosed (a server's loop); returns that error the
    /// way [`process_ready`](Channel::process_ready) does. Each wait is one blocking `recvmsg`.
    pub fn run(&mut self) -> Result<(), Error> {
        self.check_started()?;
        loop {
            if let Err(e) = self.step_inner(None) {
                return Err(self.report(e));
            }
        }
    }

    /// A hosing error met while receiving goes to `on_error`; the caller sees `Hosed`.
    fn report(&mut self, e: Error) -> Error {
        if !e.is_hosing() {
            return e;
        }
        if self.hosed {
            // Already reported (e.g. by a handler's call, or a nested receive).
            return Error::Hosed;
        }
        let handler = self.on_error.take();
        self.hose(Error::Hosed);
        match handler {
            Some(h) => {
                h(e);
                Error::Hosed
            }
            None => e,
        }
    }

    /// One receive step whose hosing error is the caller's to return (not `on_error`'s);
    /// `Ok(false)` if nothing came.
    fn step(&mut self, timeout: Option<Duration>) -> Result<bool, Error> {
        match self.step_inner(timeout) {
            Ok(got) => Ok(got),
            Err(_) if self.hosed => Err(Error::Hosed),
            Err(e) => Err(self.hose(e)),
        }
    }

    /// Receives and dispatches one event (waiting up to `timeout`); `Ok(false)` if none came.
    fn step_inner(&mut self, timeout: Option<Duration>) -> Result<bool, Error> {
        if self.hosed {
            // Hosed by a handler's call or a nested receive: reported there already.
            return Err(Error::Hosed);
        }
        match self.msgs.next_event(timeout) {
            Ok(Some(Incoming::Msg(m))) => {
                self.dispatch(m)?;
                Ok(true)
            }
            Ok(Some(Incoming::UnexpectedResponse(id))) => {
                if let Some(h) = self.on_remote_unexpected.as_mut() {
                    h(id);
                }
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn dispatch(&mut self, m: MsgIn<M>) -> Result<(), Error> {
        let answers = m.answers();
        if answers != 0 {
            return self.dispatch_response(answers, m);
        }
        let which = match m
            .segment0()
            .and_then(|s| root_discriminant(s, self.union_at))
        {
            Some(d) if d < self.union_len => MsgType(d),
            Some(_) => return Err(Error::UnknownMsgType),
            None => msg_type(&m)?,
        };
        if let Some(h) = self.expect_one.remove(&which.0) {
            h(self, m);
            return Ok(());
        }
        // Nothing of its type waiting before it and its handler idle: straight to the handler
        // (what going through the cache would do, without the two moves).
        if self.cached(which) == 0 {
            if let Some(h) = self.expect_many.get_mut(&which.0).and_then(Option::take) {
                self.run_many(which, h, m);
                // Whatever a nested receive cached meanwhile follows.
                self.deliver_cached(which);
                return Ok(());
            }
        }
        // Through the cache, so that order holds even when a handler's nested receive brings in
        // more of its own type while it runs (those wait here and follow it).
        self.cache.get_or_default(which.0).push_back(m);
        self.deliver_cached(which);
        Ok(())
    }

    /// Hands cached messages of `which` to its `expect_msgs` handler while there is one, not
    /// already running.
    fn deliver_cached(&mut self, which: MsgType) {
        while !self.hosed {
            let Some(m) = self.cache.get_mut(&which.0).and_then(VecDeque::pop_front) else {
                return;
            };
            match self.expect_many.get_mut(&which.0).and_then(Option::take) {
                Some(h) => self.run_many(which, h, m),
                None => {
                    // Not expected, or running further up the stack (it takes these when it
                    // returns): back to the front of the line.
                    self.cache.get_or_default(which.0).push_front(m);
                    return;
                }
            }
        }
    }

    /// Runs `which`'s `expect_msgs` handler (taken out of its slot while it runs) on `m`, and
    /// puts it back unless the handler undid (or replaced) the expectation.
    fn run_many(&mut self, which: MsgType, mut h: Handler<M>, m: MsgIn<M>) {
        h(self, m);
        if let Some(slot @ None) = self.expect_many.get_mut(&which.0) {
            *slot = Some(h);
        }
    }

    fn dispatch_response(&mut self, answers: u64, m: MsgIn<M>) -> Result<(), Error> {
        if answers >= self.msgs.next_message_id() {
            return Err(Error::BadResponseId(answers));
        }
        if self.sync_waiting.contains(&answers)
            && !self.sync_arrived.iter().any(|(a, _)| *a == answers)
        {
            self.sync_arrived.push((answers, m));
            return Ok(());
        }
        if let Some(req) = self.requests.get_mut(&answers) {
            req.queued.push_back(m);
            self.deliver_responses(answers);
            return Ok(());
        }
        if self.timed_out.remove(&answers) {
            return Ok(()); // a late response to a timed-out sync_request: dropped quietly
        }
        // Unexpected: dropped; our handler hears of it, and so does the sender.
        let id = m.id();
        if let Some(mut h) = self.on_unexpected.take() {
            h(self, m);
            if self.on_unexpected.is_none() && !self.hosed {
                self.on_unexpected = Some(h);
            }
        }
        if !self.hosed {
            match self.msgs.send_unexpected_notice(id) {
                Ok(()) => {}
                // Not hosing (e.g. sending was ended): the notice is a courtesy, skip it.
                Err(e) if !e.is_hosing() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Hands queued responses of request `id` to its handler (one for a one-off request) while
    /// the handler is not already running.
    fn deliver_responses(&mut self, id: u64) {
        while !self.hosed {
            let Some(req) = self.requests.get_mut(&id) else {
                return;
            };
            if req.handler.is_none() {
                return; // running further up the stack: it takes these when it returns
            }
            let Some(m) = req.queued.pop_front() else {
                return;
            };
            let expect = req.expect;
            let Some(mut h) = req.handler.take() else {
                return;
            };
            if expect == Expect::OneOff {
                // Done after this one; any other queued response is now unexpected.
                let rest = self
                    .requests
                    .remove(&id)
                    .map(|r| r.queued)
                    .unwrap_or_default();
                h(self, m);
                for extra in rest {
                    let _ = self.dispatch_response(extra.answers(), extra);
                }
                return;
            }
            h(self, m);
            if let Some(Request {
                handler: slot @ None,
                ..
            }) = self.requests.get_mut(&id)
            {
                *slot = Some(h);
            }
        }
    }
}

/// Ids of requests whose waiter gave up, so that their late responses are dropped quietly.
/// Bounded: past [`TimedOut::CAP`] the oldest are forgotten (a response that late is then
/// treated as unexpected, which is harmless).
#[derive(Default)]
struct TimedOut {
    ids: HashSet<u64, BuildHasherDefault<IdHasher>>,
    order: VecDeque<u64>,
}

impl TimedOut {
    const CAP: usize = 4096;

    fn insert(&mut self, id: u64) {
        if self.ids.insert(id) {
            self.order.push_back(id);
            while self.order.len() > Self::CAP {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                }
            }
        }
    }

    fn remove(&mut self, id: &u64) -> bool {
        // `order` keeps the id until it ages out; harmless, as ids are never reused.
        self.ids.remove(id)
    }
}

/// A map keyed by message type (a small union discriminant): a vector slot per type.
struct ByType<V>(Vec<Option<V>>);

impl<V> Default for ByType<V> {
    fn default() -> Self {
        ByType(Vec::new())
    }
}

impl<V> ByType<V> {
    fn get(&self, k: &u16) -> Option<&V> {
        self.0.get(*k as usize)?.as_ref()
    }
    fn get_mut(&mut self, k: &u16) -> Option<&mut V> {
        self.0.get_mut(*k as usize)?.as_mut()
    }
    fn contains_key(&self, k: &u16) -> bool {
        self.get(k).is_some()
    }
    fn insert(&mut self, k: u16, v: V) {
        if self.0.len() <= k as usize {
            self.0.resize_with(k as usize + 1, || None);
        }
        self.0[k as usize] = Some(v);
    }
    fn remove(&mut self, k: &u16) -> Option<V> {
        self.0.get_mut(*k as usize)?.take()
    }
    fn clear(&mut self) {
        self.0.clear();
    }
    fn get_or_default(&mut self, k: u16) -> &mut V
    where
        V: Default,
    {
        if self.0.len() <= k as usize {
            self.0.resize_with(k as usize + 1, || None);
        }
        self.0[k as usize].get_or_insert_with(V::default)
    }
}

/// Hasher for message ids (unique integers): one multiply, no SipHash.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// The root union's discriminant read straight from segment 0 when the root pointer is a plain
/// struct pointer there (as our builders make it), `None` otherwise (e.g. a far pointer: the
/// caller then asks capnp's dynamic reader). Every access is bounds-checked.
fn root_discriminant(seg0: &[u8], at: u32) -> Option<u16> {
    let ptr = u64::from_le_bytes(seg0.get(..8)?.try_into().ok()?);
    if ptr == 0 || ptr & 3 != 0 {
        return None; // null root or not a struct pointer
    }
    // Bits 2..32: signed offset in words from the end of the pointer to the data section;
    // bits 32..48: data section size in words.
    let offset = i64::from((ptr as u32 as i32) >> 2);
    let data_words = (ptr >> 32) as u16 as u64;
    let start = 8 + offset * 8;
    if start < 8 {
        return None;
    }
    if (start as u64).checked_add(data_words * 8)? > seg0.len() as u64 {
        return None; // the struct is not (wholly) in segment 0: let capnp's reader judge it
    }
    let field = u64::from(at) * 2;
    if field + 2 > data_words * 8 {
        return Some(0); // beyond the data section: the default, 0
    }
    let at = usize::try_from(start as u64 + field).ok()?;
    Some(u16::from_le_bytes(seg0.get(at..at + 2)?.try_into().ok()?))
}

/// The type of a received message: its root union's discriminant.
fn msg_type<M>(m: &MsgIn<M>) -> Result<MsgType, Error>
where
    M: Owned,
    for<'a> M::Reader<'a>: Into<dynamic_value::Reader<'a>>,
{
    let root = m.root().map_err(Error::Decode)?;
    let dynamic: dynamic_struct::Reader<'_> = root.into().downcast();
    match dynamic.which() {
        Ok(Some(field)) => Ok(MsgType(field.get_proto().get_discriminant_value())),
        Ok(None) | Err(_) => Err(Error::UnknownMsgType),
    }
}

impl<M> Pollable for Channel<M>
where
    M: Owned + Introspect,
    for<'a> M::Reader<'a>: Into<dynamic_value::Reader<'a>>,
{
    type Error = Error;

    /// The transport's, except that the socket is watched for reading only once
    /// [`start`](Channel::start)ed; nothing once hosed.
    fn interest(&self) -> Interest<'_> {
        if self.hosed {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schemas::test_msgs_capnp::cool_msg;

    /// The direct read of the discriminant agrees with capnp's dynamic reader for every type.
    #[test]
    fn root_discriminant_agrees_with_capnp() {
        let (at, len) = match root_schema::<cool_msg::Owned>()
            .unwrap()
            .get_proto()
            .which()
        {
            Ok(capnp::schema_capnp::node::Struct(st)) => {
                (st.get_discriminant_offset(), st.get_discriminant_count())
            }
            _ => panic!(),
        };
        assert_eq!(len, 7);
        for d in 0..len {
            let mut b = capnp::message::Builder::new_default();
            let mut root = b.init_root::<cool_msg::Builder<'_>>();
            match d {
                0 => drop(root.init_hello_there()),
                1 => drop(root.init_sum_request()),
                2 => drop(root.init_sum_response()),
                3 => drop(root.init_hit_me_with_your_best_shot()),
                4 => drop(root.init_my_best_shot()),
                5 => drop(root.init_blob()),
                _ => root.set_ping(()),
            }
            let seg0 = b.get_segments_for_output()[0].to_vec();
            assert_eq!(root_discriminant(&seg0, at), Some(d));
            let r = b.get_root_as_reader::<cool_msg::Reader<'_>>().unwrap();
            let dynamic: dynamic_struct::Reader<'_> = dynamic_value::Reader::from(r).downcast();
            let field = dynamic.which().unwrap().unwrap();
            assert_eq!(field.get_proto().get_discriminant_value(), d);
        }
        // A root pointer far beyond segment 0 is not type 0: the caller asks capnp instead.
        let far: u64 = 0x7FFF_FFFC;
        assert_eq!(root_discriminant(&far.to_le_bytes(), 0), None);
        // Garbage or short input is `None` or a value, never a panic.
        for bytes in [&[][..], &[1u8; 3], &[0xFF; 8], &[0x04, 0, 0, 0, 1, 0, 0, 0]] {
            let _ = root_discriminant(bytes, at);
        }
    }
}
