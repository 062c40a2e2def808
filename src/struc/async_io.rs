//! The async-I/O face of the structured channel: the process's library thread (the reactor)
//! receives and runs the handlers, one turn of the core at a time; every method may be called
//! from any thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use capnp::dynamic_value;
use capnp::introspect::Introspect;
use capnp::traits::Owned;

use super::{Channel, Error, Expect, KindOf, ReqId};
use crate::msg::{MsgIn, MsgOut};
use crate::poll::Pollable;
use crate::reactor::{self, Reactor, Registration, Source, Wait};
use crate::sync::lock;

type Done = Box<dyn FnOnce(Result<(), Error>) + Send>;
type OnError = Box<dyn FnOnce(Error) + Send>;

struct Shared<M: Owned> {
    core: Mutex<Channel<M>>,
    /// Pending `async_end_sending` completions.
    ending: Mutex<Vec<Done>>,
    stop: AtomicBool,
    /// The channel is hosed and its error handled: its turns only complete end-sending.
    dead: AtomicBool,
    /// A turn holds the core's lock: the [`reactor::thread_tag`] of the thread running it
    /// (0: none). A call from that thread now comes from one of the channel's handlers.
    in_turn: AtomicU64,
    /// A hosing error met on the library thread, for the user's `on_error`, which runs after
    /// the core is unlocked (so that it may call this channel). Shared with the core's own
    /// `on_error` (not the whole `Shared`: the core is in it, and a cycle would never be freed).
    error: Arc<Mutex<Option<Error>>>,
    /// The user's `on_error`, run once by a turn.
    on_error: Mutex<Option<OnError>>,
}

fn io(e: std::io::Error) -> Error {
    crate::transport::Error::Io(e).into()
}

/// A structured channel whose receiving runs on a library thread (see the [module
/// docs](super)): `Send + Sync`, every method callable from any thread, several
/// [`sync_request`](AsyncChannel::sync_request)s at once included.
///
/// Handlers run on the library thread (the process's one, shared by every async channel and
/// session) with the channel locked, and get `&mut Channel` to act on it (answer, expect more).
/// A handler calls this `AsyncChannel` through that `&mut Channel` only: its methods called
/// from its own handlers fail with [`Error::InOwnHandler`] (those that return no `Result`
/// panic) rather than wait for the lock the handler runs under. A handler that panics hoses its
/// channel (later calls and waiting `sync_request`s get [`Error::Hosed`]; `on_error` is not
/// called); the other channels go on. Other channels' methods may be
/// called from a handler, blocking ones included (`sync_request` runs the library thread's
/// other work while it waits).
///
/// ```
/// use std::time::{Duration, Instant};
/// use flowipc::msg::Backing;
/// use flowipc::schemas::test_msgs_capnp::{cool_msg, CoolMsgKind};
/// use flowipc::struc::{AsyncChannel, Channel};
/// use flowipc::transport::{self, ChannelConfig};
///
/// let (a, b) = transport::Channel::pair(ChannelConfig::new())?;
/// let server = AsyncChannel::new(Channel::<cool_msg::Owned>::new(b, Backing::Heap)?)?;
/// server.expect_msgs(CoolMsgKind::SumRequest, |chan, req| {
///     let mut rsp = chan.create_msg();
///     rsp.init_root().init_sum_response().set_sum(42);
///     chan.send(&mut rsp, Some(&req)).unwrap();
/// })?;
/// server.start(|e| eprintln!("server: {e}"))?;
///
/// let client = AsyncChannel::new(Channel::<cool_msg::Owned>::new(a, Backing::Heap)?)?;
/// client.start(|e| eprintln!("client: {e}"))?;
/// let mut req = client.create_msg();
/// req.init_root().init_sum_request();
/// let rsp = client.sync_request(&mut req, None, Some(Duration::from_secs(10)))?;
/// assert!(matches!(rsp.which()?, cool_msg::SumResponse(Ok(s)) if s.get_sum() == 42));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct AsyncChannel<M: Owned> {
    shared: Arc<Shared<M>>,
    /// Set by `start`.
    reg: std::sync::OnceLock<Registration>,
}

impl<M: Owned> std::fmt::Debug for AsyncChannel<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("struc::AsyncChannel")
            .field("running", &self.reg.get().is_some())
            .finish()
    }
}

impl<M> AsyncChannel<M>
where
    M: Owned + Introspect + 'static,
    for<'a> M::Reader<'a>: Into<dynamic_value::Reader<'a>>,
{
    /// Wraps a (not yet started) core. Register expectations, then [`start`](Self::start).
    pub fn new(core: Channel<M>) -> Result<Self, Error> {
        Ok(AsyncChannel {
            shared: Arc::new(Shared {
                core: Mutex::new(core),
                ending: Mutex::new(Vec::new()),
                stop: AtomicBool::new(false),
                dead: AtomicBool::new(false),
                in_turn: AtomicU64::new(0),
                error: Arc::new(Mutex::new(None)),
                on_error: Mutex::new(None),
            }),
            reg: std::sync::OnceLock::new(),
        })
    }

    /// The core, locked; [`Error::InOwnHandler`] if the caller is one of this channel's
    /// handlers, whose turn holds the lock already (waiting for it would never end).
    fn try_core(&self) -> Result<MutexGuard<'_, Channel<M>>, Error> {
        if self.shared.in_turn.load(Ordering::Relaxed) == reactor::thread_tag() {
            return Err(Error::InOwnHandler);
        }
        Ok(lock(&self.shared.core))
    }

    /// [`try_core`](Self::try_core) for the methods that return no `Result`.
    fn core(&self) -> MutexGuard<'_, Channel<M>> {
        self.try_core().unwrap_or_else(|_| {
            panic!(
                "a struc::AsyncChannel was called from one of its own handlers (or from a handler \
                 running while one of its own waits), which hold it: use the `&mut Channel` the \
                 handler gets"
            )
        })
    }

    /// Has the library thread take a turn on the channel.
    fn notify(&self) {
        if let Some(r) = self.reg.get() {
            r.notify();
        }
    }

    /// Runs `f` on the core and has the library thread take a turn if that left bytes to write.
    fn with_core<T>(
        &self,
        f: impl FnOnce(&mut Channel<M>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut core = self.try_core()?;
        let r = f(&mut core);
        let wake = core.wants_write();
        drop(core);
        if wake {
            self.notify();
        }
        r
    }

    /// Starts receiving on the library thread (the process's one, shared by every async
    /// channel). `on_error` gets the hosing error met while receiving (one met by a call is
    /// returned by it instead): at most once.
    pub fn start(&self, on_error: impl FnOnce(Error) + Send + 'static) -> Result<(), Error> {
        self.start_in(&reactor::get().map_err(io)?, on_error)
    }

    /// [`start`](Self::start) on `reactor` (a threadless one: its owner drives the channel).
    pub(crate) fn start_in(
        &self,
        reactor: &std::sync::Arc<Reactor>,
        on_error: impl FnOnce(Error) + Send + 'static,
    ) -> Result<(), Error> {
        let slot = self.shared.error.clone();
        // The core's own start refuses a second one (AlreadyStarted).
        self.core().start(move |e| *lock(&slot) = Some(e))?;
        *lock(&self.shared.on_error) = Some(Box::new(on_error));
        // The first turn comes at once: the core may hold frames read before it was handed
        // over (after a log-in, say), which no readiness of the socket would announce.
        let _ = self.reg.set(reactor.register(self.shared.clone()));
        Ok(())
    }

    /// A new, empty message with the channel's backing.
    pub fn create_msg(&self) -> MsgOut<M> {
        self.core().create_msg()
    }

    /// See [`Channel::send`].
    pub fn send(&self, msg: &mut MsgOut<M>, originating: Option<&MsgIn<M>>) -> Result<(), Error> {
        self.with_core(|c| c.send(msg, originating))
    }

    /// Sends a request and waits (this thread only; the library thread goes on receiving) for
    /// its one response, up to `timeout`. [`Error::Timeout`] is not hosing; a late response is
    /// dropped quietly. Several threads may wait at once. From a handler of another channel
    /// (on the library thread) the library thread serves the other channels while this waits;
    /// from one of this channel's own handlers it fails with [`Error::InOwnHandler`].
    pub fn sync_request(
        &self,
        msg: &mut MsgOut<M>,
        originating: Option<&MsgIn<M>>,
        timeout: Option<Duration>,
    ) -> Result<MsgIn<M>, Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        let id = self.with_core(|c| {
            if !c.is_started() {
                return Err(Error::NotStarted);
            }
            c.async_request(msg, originating, Expect::OneOff, move |_, rsp| {
                let _ = tx.try_send(rsp);
            })
        })?;
        let reactor = self.reg.get().map(|r| r.reactor());
        let got = if let Some(reactor) = reactor.filter(|r| r.must_drive()) {
            // From a handler of another channel (on the library thread), or on a threadless
            // reactor: this thread runs the reactor's other sources (this channel included)
            // while it waits.
            let deadline = timeout.map(|t| Instant::now() + t);
            let mut got = Err(true);
            reactor.nested_until(
                || match rx.try_recv() {
                    Ok(rsp) => {
                        got = Ok(rsp);
                        true
                    }
                    Err(mpsc::TryRecvError::Empty) => false,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        got = Err(false);
                        true
                    }
                },
                deadline,
            );
            got
        } else {
            match timeout {
                Some(t) => rx
                    .recv_timeout(t)
                    .map_err(|e| e == mpsc::RecvTimeoutError::Timeout),
                None => rx.recv().map_err(|_| false),
            }
        };
        match got {
            Ok(rsp) => Ok(rsp),
            Err(timed_out) => {
                let mut core = self.core();
                core.abandon_request(id);
                // It may have come between the timeout and the lock.
                if let Ok(rsp) = rx.try_recv() {
                    return Ok(rsp);
                }
                if timed_out && !core.is_hosed() {
                    Err(Error::Timeout)
                } else if core.is_peer_ended() {
                    Err(Error::PeerEnded)
                } else {
                    Err(Error::Hosed)
                }
            }
        }
    }

    /// See [`Channel::async_request`] (the handler runs on the library thread).
    pub fn async_request(
        &self,
        msg: &mut MsgOut<M>,
        originating: Option<&MsgIn<M>>,
        expect: Expect,
        handler: impl FnMut(&mut Channel<M>, MsgIn<M>) + Send + 'static,
    ) -> Result<ReqId, Error> {
        self.with_core(|c| c.async_request(msg, originating, expect, handler))
    }

    /// See [`Channel::undo_expect_responses`].
    pub fn undo_expect_responses(&self, req: ReqId) -> Result<bool, Error> {
        self.try_core()?.undo_expect_responses(req)
    }

    /// See [`Channel::expect_msg`] (a cached message is handed over inside this call, on this
    /// thread; later ones on the library thread).
    pub fn expect_msg(
        &self,
        which: impl KindOf<M>,
        handler: impl FnOnce(&mut Channel<M>, MsgIn<M>) + Send + 'static,
    ) -> Result<bool, Error> {
        self.with_core(|c| c.expect_msg(which, handler))
    }

    /// See [`Channel::expect_msgs`] (cached messages are handed over inside this call).
    pub fn expect_msgs(
        &self,
        which: impl KindOf<M>,
        handler: impl FnMut(&mut Channel<M>, MsgIn<M>) + Send + 'static,
    ) -> Result<bool, Error> {
        self.with_core(|c| c.expect_msgs(which, handler))
    }

    /// See [`Channel::undo_expect_msgs`].
    pub fn undo_expect_msgs(&self, which: impl KindOf<M>) -> Result<bool, Error> {
        self.try_core()?.undo_expect_msgs(which)
    }

    /// See [`Channel::set_unexpected_response_handler`].
    pub fn set_unexpected_response_handler(
        &self,
        handler: impl FnMut(&mut Channel<M>, MsgIn<M>) + Send + 'static,
    ) {
        self.core().set_unexpected_response_handler(handler)
    }

    /// See [`Channel::set_remote_unexpected_response_handler`].
    pub fn set_remote_unexpected_response_handler(
        &self,
        handler: impl FnMut(u64, &str) + Send + 'static,
    ) {
        self.core().set_remote_unexpected_response_handler(handler)
    }

    /// See [`Channel::unset_unexpected_response_handler`].
    pub fn unset_unexpected_response_handler(&self) {
        self.core().unset_unexpected_response_handler()
    }

    /// See [`Channel::unset_remote_unexpected_response_handler`].
    pub fn unset_remote_unexpected_response_handler(&self) {
        self.core().unset_remote_unexpected_response_handler()
    }

    /// Whether a hosing error has been reported.
    pub fn is_hosed(&self) -> bool {
        self.core().is_hosed()
    }

    /// See [`Channel::is_peer_ended`].
    pub fn is_peer_ended(&self) -> bool {
        self.core().is_peer_ended()
    }

    /// See [`Channel::set_peer_end_handler`] (it runs on the library thread; inside this call
    /// if the peer has ended already).
    pub fn set_peer_end_handler(&self, handler: impl FnOnce(&mut Channel<M>) + Send + 'static) {
        self.core().set_peer_end_handler(handler)
    }

    /// Ends sending gracefully; `on_done` runs (on the library thread) once everything sent so
    /// far and the end are written. It gets [`Error::Hosed`] if the channel is hosed first, and
    /// `Error::Msg(msg::Error::Transport(transport::Error::Aborted))` if this `AsyncChannel` is
    /// dropped first.
    pub fn async_end_sending(&self, on_done: impl FnOnce(Result<(), Error>) + Send + 'static) {
        let r = self.with_core(|c| c.end_sending().map(|()| c.is_send_done()));
        match r {
            Ok(true) => on_done(Ok(())),
            Ok(false) => {
                lock(&self.shared.ending).push(Box::new(on_done));
                self.notify();
            }
            Err(e) => on_done(Err(e)),
        }
    }
}

impl<M: Owned> AsyncChannel<M> {
    /// The reactor that drives the channel, once started.
    pub(crate) fn reactor(&self) -> Option<&std::sync::Arc<Reactor>> {
        self.reg.get().map(|r| r.reactor())
    }

    /// Stops waiting for `req`'s responses: a late one is dropped quietly (as a timed-out
    /// `sync_request`'s is). (Not from one of the channel's own handlers: nothing is done.)
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn abandon_request_any(&self, req: ReqId) {
        if self.shared.in_turn.load(Ordering::Relaxed) != reactor::thread_tag() {
            lock(&self.shared.core).abandon_request(req);
        }
    }
}

/// Marks a turn holding the core; unmarks when dropped (a panicking handler included).
struct InTurn<'a>(&'a AtomicU64);

impl<'a> InTurn<'a> {
    fn enter(flag: &'a AtomicU64) -> Self {
        flag.store(reactor::thread_tag(), Ordering::Relaxed);
        InTurn(flag)
    }
}

impl Drop for InTurn<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

impl<M> Source for Shared<M>
where
    M: Owned + Introspect + 'static,
    for<'a> M::Reader<'a>: Into<dynamic_value::Reader<'a>>,
{
    fn on_panicked(&self) {
        // The core's lock may be poisoned: its state is still whole (a handler panicked
        // between two of the core's steps), and hosing it drops the handlers, the waiting
        // `sync_request`s' senders among them: they return `Hosed`.
        lock(&self.core).abandon();
        self.dead.store(true, Ordering::Release);
        let pending = std::mem::take(&mut *lock(&self.ending));
        for f in pending {
            f(Err(Error::Hosed));
        }
    }

    /// One turn: flush, receive and dispatch, timers (the core's `on_ready`, handlers under its
    /// lock with `&mut Channel`); then, outside it, the user's `on_error` and the end-sending
    /// completions.
    fn on_ready(&self) -> Wait {
        if self.stop.load(Ordering::Acquire) {
            return Wait::idle();
        }
        let (done, hosed, wait) = if self.dead.load(Ordering::Acquire) {
            (false, true, Wait::idle())
        } else {
            let mut core = lock(&self.core);
            let turn = InTurn::enter(&self.in_turn);
            let _ = core.on_ready();
            drop(turn);
            (
                core.is_send_done(),
                core.is_hosed(),
                Wait::from(core.interest()),
            )
        };
        let err = lock(&self.error).take();
        if let Some(e) = err {
            if let Some(h) = lock(&self.on_error).take() {
                h(e);
            }
        }
        let result = if done {
            Ok(())
        } else if hosed {
            self.dead.store(true, Ordering::Release);
            Err(Error::Hosed)
        } else {
            return wait;
        };
        let pending = std::mem::take(&mut *lock(&self.ending));
        for f in pending {
            f(match &result {
                Ok(()) => Ok(()),
                Err(_) => Err(Error::Hosed),
            });
        }
        if hosed {
            Wait::idle()
        } else {
            wait
        }
    }
}

impl<M: Owned> Drop for AsyncChannel<M> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // Off the library thread: no turn of this channel runs after this (unless dropped from
        // one of its handlers: that turn ends once the handler returns, doing nothing more).
        drop(self.reg.take());
        let pending = std::mem::take(&mut *lock(&self.shared.ending));
        for f in pending {
            f(Err(crate::transport::Error::Aborted.into()));
        }
    }
}
