//! Expectations and requests for [`Channel`]: `expect_msg(s)` and the cache, requests
//! (`sync_request`, `async_request`) and their undoing, the unexpected-response handlers, and
//! the small maps that hold them ([`ByType`], [`TimedOut`], [`IdHasher`]).

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use capnp::traits::Owned;

use super::{Channel, Expect, Handler, ReqId, Request};
use crate::msg::{MsgIn, MsgOut};
use crate::struc::{Error, KindOf, MsgType};

impl<M: Owned> Channel<M> {
    /// Sends a request and blocks for its one response (up to `timeout`; `None`: no limit),
    /// handling other incoming messages meanwhile. [`Error::Timeout`] is not hosing; a response
    /// arriving later is dropped quietly (not an unexpected response). [`Error::PeerEnded`]
    /// (not hosing) if the peer ends its sending first, or has already (then nothing is sent).
    pub fn sync_request(
        &mut self,
        msg: &mut MsgOut<M>,
        originating: Option<&MsgIn<M>>,
        timeout: Option<Duration>,
    ) -> Result<MsgIn<M>, Error> {
        self.sync_request_with_fd(msg, originating, None, timeout)
    }

    /// [`sync_request`](Channel::sync_request) with an fd riding along, as
    /// [`send_with_fd`](Channel::send_with_fd) (`None`: the message's own, if any).
    pub fn sync_request_with_fd(
        &mut self,
        msg: &mut MsgOut<M>,
        originating: Option<&MsgIn<M>>,
        fd: Option<BorrowedFd<'_>>,
        timeout: Option<Duration>,
    ) -> Result<MsgIn<M>, Error> {
        self.check_started()?;
        if self.peer_ended {
            return Err(Error::PeerEnded);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let id = self.send_with_fd(msg, originating, fd)?;
        self.sync_waiting.push(id);
        let r = loop {
            if let Some(i) = self.sync_arrived.iter().position(|(a, _)| *a == id) {
                break Ok(self.sync_arrived.swap_remove(i).1);
            }
            if self.peer_ended {
                break Err(Error::PeerEnded);
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
    /// every one until [`undo_expect_responses`](Channel::undo_expect_responses) or the peer's
    /// end (see [`is_peer_ended`](Channel::is_peer_ended): the handler is dropped then). After
    /// the peer's end, [`Error::PeerEnded`] and nothing is sent.
    pub fn async_request(
        &mut self,
        msg: &mut MsgOut<M>,
        originating: Option<&MsgIn<M>>,
        expect: Expect,
        handler: impl FnMut(&mut Channel<M>, MsgIn<M>) + Send + 'static,
    ) -> Result<ReqId, Error> {
        self.async_request_with_fd(msg, originating, None, expect, handler)
    }

    /// [`async_request`](Channel::async_request) with an fd riding along, as
    /// [`send_with_fd`](Channel::send_with_fd).
    pub fn async_request_with_fd(
        &mut self,
        msg: &mut MsgOut<M>,
        originating: Option<&MsgIn<M>>,
        fd: Option<BorrowedFd<'_>>,
        expect: Expect,
        handler: impl FnMut(&mut Channel<M>, MsgIn<M>) + Send + 'static,
    ) -> Result<ReqId, Error> {
        self.check()?;
        if self.peer_ended {
            return Err(Error::PeerEnded);
        }
        let id = self.send_with_fd(msg, originating, fd)?;
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
        which: impl KindOf<M>,
        handler: impl FnOnce(&mut Channel<M>, MsgIn<M>) + Send + 'static,
    ) -> Result<bool, Error> {
        self.check()?;
        let which = which.msg_type();
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
        which: impl KindOf<M>,
        handler: impl FnMut(&mut Channel<M>, MsgIn<M>) + Send + 'static,
    ) -> Result<bool, Error> {
        self.check()?;
        let which = which.msg_type();
        if self.is_expected(which) {
            return Ok(false);
        }
        let mut handler: Handler<M> = Box::new(handler);
        // Registered as running (None) while the cache drains, so that a handler calling
        // `undo_expect_msgs` on its own type stops the rest.
        self.expect_many.insert(which.0, None);
        while let Some(m) = self.cache.get_mut(&which.0).and_then(VecDeque::pop_front) {
            handler(self, m);
            if self.hosing.is_hosed() || !self.expect_many.contains_key(&which.0) {
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
    pub fn undo_expect_msgs(&mut self, which: impl KindOf<M>) -> Result<bool, Error> {
        self.check()?;
        Ok(self.expect_many.remove(&which.msg_type().0).is_some())
    }

    fn is_expected(&self, which: MsgType) -> bool {
        self.expect_one.contains_key(&which.0) || self.expect_many.contains_key(&which.0)
    }

    /// The sync_io way to expect one message: the oldest cached message of type `which`, if
    /// any, handed back directly (no handler); `None` if none is cached (then register with
    /// [`expect_msg`](Channel::expect_msg) to get the next one).
    pub fn take_cached(&mut self, which: impl KindOf<M>) -> Result<Option<MsgIn<M>>, Error> {
        self.check()?;
        Ok(self
            .cache
            .get_mut(&which.msg_type().0)
            .and_then(VecDeque::pop_front))
    }

    /// Messages of type `which` waiting in the cache.
    pub fn cached(&self, which: impl KindOf<M>) -> usize {
        self.cache.get(&which.msg_type().0).map_or(0, VecDeque::len)
    }

    /// Called with each response nothing expected (after it is dropped from dispatch).
    pub fn set_unexpected_response_handler(
        &mut self,
        handler: impl FnMut(&mut Channel<M>, MsgIn<M>) + Send + 'static,
    ) {
        self.on_unexpected = Some(Box::new(handler));
    }

    /// Called with the id of each of our messages that the peer received as an unexpected
    /// response, and the peer's description of it (e.g. `"sumResponse 7 answers message 3,
    /// which expects no response (any more)"`; at most 512 bytes).
    pub fn set_remote_unexpected_response_handler(
        &mut self,
        handler: impl FnMut(u64, &str) + Send + 'static,
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
}

impl<M: Owned> Channel<M> {
    /// Stops expecting responses to `req` like
    /// [`undo_expect_responses`](Channel::undo_expect_responses), and drops any that still
    /// arrive quietly (for a request whose waiter gave up: not unexpected responses).
    pub(crate) fn abandon_request(&mut self, req: ReqId) {
        self.requests.remove(&req.0);
        self.timed_out.insert(req.0);
    }
}

/// Ids of requests whose waiter gave up, so that their late responses are dropped quietly.
/// Bounded: past [`TimedOut::CAP`] the oldest are forgotten (a response that late is then
/// treated as unexpected, which is harmless).
#[derive(Default)]
pub(super) struct TimedOut {
    ids: HashSet<u64, BuildHasherDefault<IdHasher>>,
    order: VecDeque<u64>,
}

impl TimedOut {
    const CAP: usize = 4096;

    pub(super) fn insert(&mut self, id: u64) {
        if self.ids.insert(id) {
            self.order.push_back(id);
            while self.order.len() > Self::CAP {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                }
            }
        }
    }

    pub(super) fn remove(&mut self, id: &u64) -> bool {
        // `order` keeps the id until it ages out; harmless, as ids are never reused.
        self.ids.remove(id)
    }
}

/// A map keyed by message type (a small union discriminant): a vector slot per type.
pub(super) struct ByType<V>(pub(super) Vec<Option<V>>);

impl<V> Default for ByType<V> {
    fn default() -> Self {
        ByType(Vec::new())
    }
}

impl<V> ByType<V> {
    pub(super) fn get(&self, k: &u16) -> Option<&V> {
        self.0.get(*k as usize)?.as_ref()
    }
    pub(super) fn get_mut(&mut self, k: &u16) -> Option<&mut V> {
        self.0.get_mut(*k as usize)?.as_mut()
    }
    pub(super) fn contains_key(&self, k: &u16) -> bool {
        self.get(k).is_some()
    }
    pub(super) fn insert(&mut self, k: u16, v: V) {
        if self.0.len() <= k as usize {
            self.0.resize_with(k as usize + 1, || None);
        }
        self.0[k as usize] = Some(v);
    }
    pub(super) fn remove(&mut self, k: &u16) -> Option<V> {
        self.0.get_mut(*k as usize)?.take()
    }
    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
    pub(super) fn get_or_default(&mut self, k: u16) -> &mut V
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
pub(super) struct IdHasher(u64);

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
