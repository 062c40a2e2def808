//! The async-I/O face of the structured channel: a library thread receives and runs the
//! handlers; every method may be called from any thread.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use capnp::dynamic_value;
use capnp::introspect::Introspect;
use capnp::traits::Owned;

use super::{Channel, Error, Expect, MsgType, ReqId};
use crate::msg::{MsgIn, MsgOut};
use crate::sys::{self, PollFd};

type Done = Box<dyn FnOnce(Result<(), Error>) + Send>;

struct Shared<M: Owned> {
    core: Mutex<Channel<M>>,
    /// Pending `async_end_sending` completions.
    ending: Mutex<Vec<Done>>,
    stop: AtomicBool,
    /// Written to wake the library thread (something to flush, or stop).
    waker: UnixStream,
    /// A hosing error met on the library thread, for the user's `on_error`, which runs after
    /// the core is unlocked (so that it may call this channel). Shared with the core's own
    /// `on_error` (not the whole `Shared`: the core is in it, and a cycle would never be freed).
    error: Arc<Mutex<Option<Error>>>,
}

impl<M: Owned> Shared<M> {
    fn wake(&self) {
        // Full pipe: the thread is awake already.
        let _ = (&self.waker).write(&[1]);
    }
}

fn io(e: std::io::Error) -> Error {
    crate::transport::Error::Io(e).into()
}

/// A structured channel whose receiving runs on a library thread (see the [module
/// docs](super)): `Send + Sync`, every method callable from any thread, several
/// [`sync_request`](AsyncChannel::sync_request)s at once included.
///
/// Handlers run on the library thread with the channel locked, and get `&mut Channel` to act on
/// it (answer, expect more). A handler must not call methods of this `AsyncChannel` (that
/// would wait for the lock it runs under): use the `&mut Channel` it is given.
///
/// ```
/// use std::time::{Duration, Instant};
/// use flowipc::msg::Backing;
/// use flowipc::schemas::test_msgs_capnp::cool_msg;
/// use flowipc::struc::{AsyncChannel, Channel, MsgType};
/// use flowipc::transport::{self, ChannelConfig};
///
/// let (a, b) = transport::Channel::pair(ChannelConfig::new())?;
/// let server = AsyncChannel::new(Channel::<cool_msg::Owned>::new(b, Backing::Heap)?)?;
/// server.expect_msgs(MsgType::of::<cool_msg::Owned>("sumRequest")?, |chan, req| {
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
/// assert!(matches!(rsp.root()?.which()?, cool_msg::SumResponse(Ok(s)) if s.get_sum() == 42));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct AsyncChannel<M: Owned> {
    shared: Arc<Shared<M>>,
    /// The thread's end of the waker, until `start` hands it over.
    waker_rx: Mutex<Option<UnixStream>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<M: Owned> std::fmt::Debug for AsyncChannel<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("struc::AsyncChannel")
            .field("running", &lock(&self.thread).is_some())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<M> AsyncChannel<M>
where
    M: Owned + Introspect + 'static,
    for<'a> M::Reader<'a>: Into<dynamic_value::Reader<'a>>,
{
    /// Wraps a (not yet started) core. Register expectations, then [`start`](Self::start).
    pub fn new(core: Channel<M>) -> Result<Self, Error> {
        let (tx, rx) = UnixStream::pair().map_err(io)?;
        tx.set_nonblocking(true).map_err(io)?;
        rx.set_nonblocking(true).map_err(io)?;
        Ok(AsyncChannel {
            shared: Arc::new(Shared {
                core: Mutex::new(core),
                ending: Mutex::new(Vec::new()),
                stop: AtomicBool::new(false),
                waker: tx,
                error: Arc::new(Mutex::new(None)),
            }),
            waker_rx: Mutex::new(Some(rx)),
            thread: Mutex::new(None),
        })
    }

    fn core(&self) -> MutexGuard<'_, Channel<M>> {
        lock(&self.shared.core)
    }

    /// Runs `f` on the core and wakes the thread if that left bytes to write.
    fn with_core<T>(&self, f: impl FnOnce(&mut Channel<M>) -> T) -> T {
        let mut core = self.core();
        let r = f(&mut core);
        let wake = core.wants_write();
        drop(core);
        if wake {
            self.shared.wake();
        }
        r
    }

    /// Starts receiving on a library thread. `on_error` gets the hosing error met while
    /// receiving (one met by a call is returned by it instead): at most once.
    pub fn start(&self, on_error: impl FnOnce(Error) + Send + 'static) -> Result<(), Error> {
        let slot = self.shared.error.clone();
        self.core().start(move |e| *lock(&slot) = Some(e))?;
        let Some(rx) = lock(&self.waker_rx).take() else {
            return Err(Error::AlreadyStarted);
        };
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("flowipc-struc".into())
            .spawn(move || run(shared, rx, on_error))
            .map_err(io)?;
        *lock(&self.thread) = Some(thread);
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
    /// dropped quietly. Several threads may wait at once.
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
        let got = match timeout {
            Some(t) => rx
                .recv_timeout(t)
                .map_err(|e| e == mpsc::RecvTimeoutError::Timeout),
            None => rx.recv().map_err(|_| false),
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
        self.core().undo_expect_responses(req)
    }

    /// See [`Channel::expect_msg`] (a cached message is handed over inside this call, on this
    /// thread; later ones on the library thread).
    pub fn expect_msg(
        &self,
        which: MsgType,
        handler: impl FnOnce(&mut Channel<M>, MsgIn<M>) + Send + 'static,
    ) -> Result<bool, Error> {
        self.with_core(|c| c.expect_msg(which, handler))
    }

    /// See [`Channel::expect_msgs`] (cached messages are handed over inside this call).
    pub fn expect_msgs(
        &self,
        which: MsgType,
        handler: impl FnMut(&mut Channel<M>, MsgIn<M>) + Send + 'static,
    ) -> Result<bool, Error> {
        self.with_core(|c| c.expect_msgs(which, handler))
    }

    /// See [`Channel::undo_expect_msgs`].
    pub fn undo_expect_msgs(&self, which: MsgType) -> Result<bool, Error> {
        self.core().undo_expect_msgs(which)
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
        handler: impl FnMut(u64) + Send + 'static,
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
                self.shared.wake();
            }
            Err(e) => on_done(Err(e)),
        }
    }
}

/// The library thread: waits for the channel's fd (and the waker), flushes, receives and runs
/// handlers, completes end-sending.
fn run<M>(shared: Arc<Shared<M>>, waker: UnixStream, on_error: impl FnOnce(Error))
where
    M: Owned + Introspect + 'static,
    for<'a> M::Reader<'a>: Into<dynamic_value::Reader<'a>>,
{
    let mut drain = [0u8; 64];
    // The socket never changes: one duplicate of its fd to poll, taken once.
    let fd = lock(&shared.core).as_fd().try_clone_to_owned();
    // And the transport's fd side socket, polled for writability while it has no room.
    let side = lock(&shared.core)
        .side_fd()
        .map(|s| s.try_clone_to_owned().ok());
    let mut first = true;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let (wants_write, on_side, deadline) = {
            let mut core = lock(&shared.core);
            if core.is_hosed() {
                break;
            }
            let w = core.wants_write();
            (w, w && core.waits_on_side(), core.next_deadline())
        };
        let Ok(fd) = fd.as_ref() else { break };
        let out = match &side {
            Some(Some(s)) if on_side => s,
            Some(None) => break, // the duplicate failed: as for the socket's
            _ => fd,
        };
        let mut fds = [
            PollFd::new(fd.as_fd(), true, wants_write && !on_side),
            PollFd::new(waker.as_fd(), true, false),
            PollFd::new(out.as_fd(), false, on_side),
        ];
        // The first time round, no wait: the core may hold frames read before it was handed
        // over (after a log-in, say), which no readiness of the socket would announce.
        let timeout = if first {
            Some(Duration::ZERO)
        } else {
            deadline.map(|d| d.saturating_duration_since(Instant::now()))
        };
        first = false;
        if sys::poll(&mut fds, timeout).is_err() {
            continue;
        }
        while matches!((&waker).read(&mut drain), Ok(n) if n > 0) {}
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let mut core = lock(&shared.core);
        core.flush_reporting();
        let _ = core.process_ready();
        if deadline.is_some_and(|d| d <= Instant::now()) {
            let _ = core.on_timer();
        }
        let done = core.is_send_done();
        let hosed = core.is_hosed();
        drop(core);
        let error = lock(&shared.error).take();
        if let Some(e) = error {
            on_error(e);
            break;
        }
        if done || hosed {
            let pending = std::mem::take(&mut *lock(&shared.ending));
            for f in pending {
                f(if done { Ok(()) } else { Err(Error::Hosed) });
            }
        }
        if hosed {
            break;
        }
    }
    // Hosed: nothing more will complete.
    let pending = std::mem::take(&mut *lock(&shared.ending));
    for f in pending {
        f(Err(Error::Hosed));
    }
}

impl<M: Owned> Drop for AsyncChannel<M> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(t) = lock(&self.thread).take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        let pending = std::mem::take(&mut *lock(&self.shared.ending));
        for f in pending {
            f(Err(crate::transport::Error::Aborted.into()));
        }
    }
}
