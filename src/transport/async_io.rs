//! The async-I/O face: [`AsyncChannel`], a [`Channel`] driven by the process's library thread
//! (the reactor), which runs the user's handlers outside the channel's lock.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Channel, Error, Frame, OutFrame};
use crate::poll::Pollable;
use crate::reactor::{self, Registration, Source, Wait};
use crate::sync::lock;

/// Frames read per turn before handlers run (and other channels get their turn).
const BATCH: usize = 64;

type EndHandler = Box<dyn FnOnce(Result<(), Error>) + Send>;
type PeerEndHandler = Box<dyn FnOnce() + Send>;

struct State {
    chan: Channel,
    /// The reactor will run this channel's turn (it is due, or polls for writability):
    /// senders that queue need not notify it.
    polling_out: bool,
    /// `async_end_sending` handlers waiting for the END frame to be written.
    end_waiters: Vec<EndHandler>,
    /// Handlers whose result is known, to run on the library thread.
    ready: Vec<(EndHandler, Result<(), Error>)>,
    /// The user's handler of the peer's end, until it runs (after the frames before the end).
    on_peer_end: Option<PeerEndHandler>,
    /// Off the library thread for good (a handler panicked): no turn runs completions.
    gone: bool,
}

/// The user's handlers and the turn's scratch: only the reactor thread takes this lock, and
/// never the state's while holding it across a handler.
struct Handlers {
    on_frame: Box<dyn FnMut(Frame) + Send>,
    on_error: Option<Box<dyn FnOnce(Error) + Send>>,
    frames: Vec<Frame>,
}

struct Shared {
    state: Mutex<State>,
    handlers: Mutex<Handlers>,
    /// The `AsyncChannel` is dropped: no handler runs any more (read between handlers, so
    /// outside the state's lock).
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

/// A [`Channel`] whose receiving, flushing and timers run on the library thread.
///
/// [`start`](AsyncChannel::start) hands the channel to the process's library thread (one
/// thread serves every async channel and session of the process), which runs `on_frame` for
/// each received frame, in order, and `on_error` once with the hosing error, after which it
/// reads no more. The peer's graceful end is no error: it reads no more either, and runs the
/// handler given to [`on_peer_end`](AsyncChannel::on_peer_end), if any, after the last frame;
/// sending goes on. Sends are made from any thread: they take a lock around the core,
/// write directly when the socket takes the bytes, and otherwise queue them for the library
/// thread to write when the socket is writable.
///
/// A hosing error is reported exactly once: to the send (or
/// [`async_end_sending`](AsyncChannel::async_end_sending)) call that ran into it, or else to
/// `on_error`. Handlers run on the library thread, never under the lock, so they may call
/// [`send`](AsyncChannel::send) (give them a `Weak<AsyncChannel>`: a strong `Arc` inside a
/// handler is a reference cycle through the library thread, and the channel would never be
/// dropped). Handlers should not block (they hold up every channel of the process) and
/// should not panic (a panicking handler hoses its channel: later calls answer
/// [`Error::Hosed`], pending end-sending handlers get it, `on_error` is not called; the other
/// channels go on).
///
/// Dropping the `AsyncChannel` takes it off the library thread, waiting for a handler of its
/// own that runs at that moment (unless dropped from one of its own handlers); end-sending
/// handlers still pending get [`Error::Aborted`], on the dropping thread. Queued bytes not yet
/// written are discarded.
///
/// ```
/// use std::sync::mpsc;
/// use flowipc::transport::{AsyncChannel, Channel, ChannelConfig, Error};
///
/// let (a, mut b) = Channel::pair(ChannelConfig::new())?;
/// let (tx, rx) = mpsc::channel();
/// let a = AsyncChannel::start(a, move |frame| tx.send(frame.payload.to_vec()).unwrap(), |_err| {})?;
/// b.send(b"hello")?;
/// assert_eq!(rx.recv().unwrap(), b"hello");
/// a.send(b"back")?;
/// let got = b.recv_blocking(None)?.unwrap();
/// assert_eq!(&*got.payload, b"back");
/// # Ok::<(), Error>(())
/// ```
pub struct AsyncChannel {
    shared: Arc<Shared>,
    reg: Option<Registration>,
}

impl fmt::Debug for AsyncChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("AsyncChannel")
            .field("channel", &st.chan)
            .field("pending_end_handlers", &st.end_waiters.len())
            .finish()
    }
}

impl AsyncChannel {
    /// Hands `channel` to the library thread (see the type's docs).
    pub fn start(
        channel: Channel,
        on_frame: impl FnMut(Frame) + Send + 'static,
        on_error: impl FnOnce(Error) + Send + 'static,
    ) -> Result<AsyncChannel, Error> {
        let reactor = reactor::get().map_err(Error::Io)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                chan: channel,
                polling_out: true,
                end_waiters: Vec::new(),
                ready: Vec::new(),
                on_peer_end: None,
                gone: false,
            }),
            handlers: Mutex::new(Handlers {
                on_frame: Box::new(on_frame),
                on_error: Some(Box::new(on_error)),
                frames: Vec::with_capacity(BATCH),
            }),
            stop: AtomicBool::new(false),
        });
        // Its first turn comes at once: the core may hold frames read before it was handed
        // over, which no readiness of the socket would announce.
        let reg = reactor.register(shared.clone());
        Ok(AsyncChannel {
            shared,
            reg: Some(reg),
        })
    }

    fn notify(&self) {
        if let Some(r) = &self.reg {
            r.notify();
        }
    }

    /// Runs `f` on the core under the lock, then has the library thread run if it has to write
    /// (or see a hosing error) and does not know yet.
    fn with_core<R>(&self, f: impl FnOnce(&mut Channel) -> Result<R, Error>) -> Result<R, Error> {
        let mut st = self.shared.lock();
        let r = f(&mut st.chan);
        let hosed_now = matches!(&r, Err(e) if e.is_hosing());
        let wake = hosed_now || (st.chan.wants_write() && !st.polling_out);
        if wake {
            st.polling_out = true;
        }
        drop(st);
        if wake {
            self.notify();
        }
        r
    }

    /// [`Channel::send`] from any thread.
    pub fn send<'a>(&self, frame: impl Into<OutFrame<'a>>) -> Result<(), Error> {
        let frame = frame.into();
        self.with_core(|c| c.send(frame))
    }

    /// Ends sending ([`Channel::end_sending`]); `on_done` runs on the library thread once the
    /// END frame (and everything sent before it) is written, with `Ok(())`, or with the error
    /// that prevented it ([`Error::Hosed`] if the channel was or got hosed, the hosing error
    /// itself if ending ran into it, [`Error::Aborted`] if the `AsyncChannel` is dropped
    /// first). Calling it again adds another handler for the same END frame.
    pub fn async_end_sending(&self, on_done: impl FnOnce(Result<(), Error>) + Send + 'static) {
        let h: EndHandler = Box::new(on_done);
        let mut st = self.shared.lock();
        if st.gone {
            drop(st);
            return h(Err(Error::Hosed));
        }
        let r = if st.chan.is_sending_ended() && !st.chan.is_hosed() {
            Ok(())
        } else {
            st.chan.end_sending()
        };
        match r {
            Ok(()) if st.chan.is_send_done() => st.ready.push((h, Ok(()))),
            Ok(()) => st.end_waiters.push(h),
            Err(e) => st.ready.push((h, Err(e))),
        }
        st.polling_out = true;
        drop(st);
        self.notify();
    }

    /// Whether the channel was hosed.
    pub fn is_hosed(&self) -> bool {
        self.shared.lock().chan.is_hosed()
    }

    /// Whether the peer ended its sending and every frame before its end has been received
    /// (see [`Channel::is_peer_ended`]).
    pub fn is_peer_ended(&self) -> bool {
        self.shared.lock().chan.is_peer_ended()
    }

    /// Sets the handler of the peer's graceful end ([`Channel::end_sending`] on its side): it
    /// runs once, on the library thread, after `on_frame` got every frame sent before the end
    /// (at the next turn if the end came already). Replaces a handler that has not run yet.
    pub fn on_peer_end(&self, handler: impl FnOnce() + Send + 'static) {
        let mut st = self.shared.lock();
        st.on_peer_end = Some(Box::new(handler));
        let due = st.chan.is_peer_ended();
        drop(st);
        if due {
            self.notify();
        }
    }

    /// Bytes waiting in the send queue.
    pub fn queued_bytes(&self) -> usize {
        self.shared.lock().chan.queued_bytes()
    }
}

impl Drop for AsyncChannel {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // Off the library thread: no turn of this channel runs after this (unless dropped from
        // one of its handlers: that turn ends once the handler returns, doing nothing more).
        drop(self.reg.take());
        let mut st = self.shared.lock();
        let ready = std::mem::take(&mut st.ready);
        let waiters = std::mem::take(&mut st.end_waiters);
        drop(st);
        for (h, r) in ready {
            h(r);
        }
        for h in waiters {
            h(Err(Error::Aborted));
        }
    }
}

impl Source for Shared {
    fn on_panicked(&self) {
        let mut st = self.lock();
        st.chan.abandon();
        st.gone = true;
        let mut done = std::mem::take(&mut st.ready);
        done.extend(st.end_waiters.drain(..).map(|h| (h, Err(Error::Hosed))));
        drop(st);
        for (h, r) in done {
            h(r);
        }
    }

    /// One turn: timers, flush, up to `BATCH` frames; then, outside the state's lock, the
    /// frame handlers in order, the peer's end, the end-sending completions and the hosing
    /// error.
    fn on_ready(&self) -> Wait {
        let mut h = lock(&self.handlers);
        let h = &mut *h;
        let mut err = None;
        let stopped = || self.stop.load(Ordering::Acquire);
        let (done, peer_end, wait, more) = {
            let mut st = self.lock();
            if stopped() {
                return Wait::idle();
            }
            // (A hosed channel does no more socket work: only completions.)
            if !st.chan.is_hosed() {
                let chan = &mut st.chan;
                err = chan.on_ready().err();
                while err.is_none() && h.frames.len() < BATCH {
                    match chan.try_recv() {
                        Ok(Some(f)) => h.frames.push(f),
                        Ok(None) => break,
                        Err(e) => err = Some(e),
                    }
                }
            }
            // The peer's end, once the frames before it are all taken.
            let peer_end = if st.chan.is_peer_ended() && h.frames.len() < BATCH {
                st.on_peer_end.take()
            } else {
                None
            };
            let mut done = std::mem::take(&mut st.ready);
            if st.chan.is_send_done() {
                done.extend(st.end_waiters.drain(..).map(|h| (h, Ok(()))));
            } else if st.chan.is_hosed() {
                done.extend(st.end_waiters.drain(..).map(|h| (h, Err(Error::Hosed))));
            }
            // (Both say nothing of a hosed channel: it wants no write, and no fd or timer.)
            st.polling_out = st.chan.wants_write();
            let wait = Wait::from(st.chan.interest());
            (done, peer_end, wait, h.frames.len() == BATCH)
        };
        // Handlers, outside the lock, in order: frames received before the error first. A
        // handler may drop the channel: then no handler runs any more (the end-sending
        // completions taken here are still owed: they get `Aborted`).
        for f in h.frames.drain(..) {
            if stopped() {
                break;
            }
            (h.on_frame)(f);
        }
        if let Some(cb) = peer_end.filter(|_| !stopped()) {
            cb();
        }
        let stop = stopped();
        for (cb, r) in done {
            cb(if stop { Err(Error::Aborted) } else { r });
        }
        if let Some(e) = err {
            // `Hosed`: the error was reported to the send call that ran into it.
            if e.is_hosing() && !stopped() {
                if let Some(cb) = h.on_error.take() {
                    cb(e);
                }
            }
        }
        if more {
            Wait::again()
        } else {
            wait
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::ChannelConfig;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_hosing_error_is_reported_once_to_the_sender_or_the_handler() {
        for round in 0..20 {
            let (a, b) = Channel::pair(ChannelConfig::new()).unwrap();
            let handler_calls = Arc::new(AtomicUsize::new(0));
            let h = handler_calls.clone();
            let a = AsyncChannel::start(
                a,
                |_| {},
                move |_| {
                    h.fetch_add(1, Ordering::SeqCst);
                },
            )
            .unwrap();
            // Data for `b` that it never reads makes closing it a reset, reported either to
            // one of our sends or to the handler.
            a.send(&[0; 1000]).unwrap();
            if round % 2 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(b);
            let mut send_reports = 0;
            for _ in 0..100_000 {
                match a.send(&[1; 1000]) {
                    Ok(()) => std::thread::yield_now(),
                    Err(Error::Hosed) => break,
                    Err(e) => {
                        assert!(e.is_hosing(), "{e:?}");
                        send_reports += 1;
                    }
                }
            }
            assert!(a.is_hosed());
            let (tx, rx) = mpsc::channel();
            a.async_end_sending(move |r| tx.send(r).unwrap());
            let r = rx.recv_timeout(Duration::from_secs(20)).unwrap();
            assert!(matches!(r, Err(Error::Hosed)), "{r:?}");
            drop(a); // joins: no handler runs after this
            assert_eq!(send_reports + handler_calls.load(Ordering::SeqCst), 1);
        }
    }

    #[test]
    fn drop_aborts_pending_end_sending_and_handlers_may_send() {
        let (a, mut b) = Channel::pair(ChannelConfig::new()).unwrap();
        // The handler holds a weak reference: a strong one would be a cycle (channel -> thread
        // -> handler -> channel) and the channel would never drop.
        let me: Arc<std::sync::OnceLock<std::sync::Weak<AsyncChannel>>> = Arc::default();
        let me2 = me.clone();
        let a = Arc::new(
            AsyncChannel::start(
                a,
                move |f| {
                    if let Some(a) = me2.get().and_then(|w| w.upgrade()) {
                        a.send(&f.payload).unwrap();
                    }
                },
                |_| {},
            )
            .unwrap(),
        );
        me.set(Arc::downgrade(&a)).unwrap();
        b.send(b"ping").unwrap();
        let f = b
            .recv_blocking(Some(Duration::from_secs(20)))
            .unwrap()
            .unwrap();
        assert_eq!(&*f.payload, b"ping");
        // Fill `b`'s receive side so the END frame cannot be written, then drop.
        let big = vec![0u8; 1 << 20];
        while a.queued_bytes() == 0 {
            a.send(&big).unwrap();
        }
        let (tx, rx) = mpsc::channel();
        a.async_end_sending(move |r| tx.send(r).unwrap());
        // The handler may still hold the reference it upgraded to answer "ping" for a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while Arc::strong_count(&a) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let a = Arc::try_unwrap(a).ok();
        assert!(a.is_some(), "only this test holds the channel now");
        drop(a);
        let r = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert!(matches!(r, Err(Error::Aborted)), "{r:?}");
    }

    /// Found in review: the library thread sleeping in `poll` kept the dropped channel's socket
    /// open (the kernel holds polled files for the call) until some other event woke it.
    #[test]
    fn dropping_an_idle_async_channel_closes_its_socket_at_once() {
        let (a, mut b) = Channel::pair(ChannelConfig::new()).unwrap();
        let a = AsyncChannel::start(a, |_| {}, |_| {}).unwrap();
        // Let the library thread settle into its poll, with a's socket in it.
        std::thread::sleep(Duration::from_millis(100));
        drop(a);
        let r = b.recv_blocking(Some(Duration::from_secs(10)));
        assert!(matches!(r, Err(Error::PeerGone)), "{r:?}");
    }

    /// Found in review: a turn went on running handlers for the frames it had read after one
    /// of them dropped the channel.
    #[test]
    fn no_handler_runs_once_a_handler_dropped_its_channel() {
        let (a, mut b) = Channel::pair(ChannelConfig::new()).unwrap();
        for i in 0..10u8 {
            b.send(&[i]).unwrap();
        }
        let slot: Arc<Mutex<Option<AsyncChannel>>> = Arc::default();
        let after = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, a2, d2) = (slot.clone(), after.clone(), dropped.clone());
        let (a3, d3) = (after.clone(), dropped.clone());
        // Holding the slot's lock until the channel is in it: the first turn waits for that.
        let mut filling = slot.lock().unwrap();
        let chan = AsyncChannel::start(
            a,
            move |_| {
                if d2.load(Ordering::SeqCst) {
                    a2.fetch_add(1, Ordering::SeqCst);
                } else if let Some(mine) = s.lock().unwrap().take() {
                    d2.store(true, Ordering::SeqCst);
                    drop(mine);
                }
            },
            move |_| {
                if d3.load(Ordering::SeqCst) {
                    a3.fetch_add(100, Ordering::SeqCst);
                }
            },
        )
        .unwrap();
        *filling = Some(chan);
        drop(filling);
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while !dropped.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < end, "the handler never ran");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(b); // an error the dropped channel must not report either
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(after.load(Ordering::SeqCst), 0);
    }
}
