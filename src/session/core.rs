//! What both sides of an open session can do: open channels, make structured channels, reach the
//! arenas, lend and borrow objects.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use capnp::dynamic_value;
use capnp::introspect::Introspect;
use capnp::traits::Owned;

use super::lends::Lends;
use super::pools::Pools;
use super::{Error, Metadata, SessionConfig};
use crate::hosing::{Hosing, Report};
use crate::msg::{Backing, MsgChannel, MsgIn};
use crate::poll::Interest;
use crate::reactor::{Notifier, Reactor, Registration, Source, Wait};
use crate::schemas::session_capnp::master;
use crate::shm::{Arena, LendBlob, ShmHandle, ShmSafe};
use crate::struc::{self, MsgType};
use crate::sync::lock;
use crate::transport;

pub(crate) type Master = master::Owned;

/// The handler of channels the peer opens: the channel and the peer's metadata.
pub(crate) type PassiveOpen = Box<dyn FnMut(transport::Channel, Option<Metadata>) + Send>;
/// The session's error handler.
pub(crate) type OnError = Box<dyn FnOnce(Error) + Send>;

/// The channels made at log-in: those the client asked for and those the server decided on, in
/// order. Each side gets its ends of the same channels.
#[derive(Debug, Default)]
pub struct InitChannels {
    /// Requested by the client (see [`ConnectOptions::init_channels`](super::ConnectOptions)).
    pub by_client: Vec<transport::Channel>,
    /// Decided by the server (see
    /// [`SessionServerBuilder::init_channels`](super::SessionServerBuilder::init_channels)).
    pub by_server: Vec<transport::Channel>,
}

impl InitChannels {
    /// Files `chan` under the side that asked for it (a resource of kind `kind`).
    pub(crate) fn push(&mut self, kind: u8, chan: transport::Channel) {
        if kind == super::proto::RES_INIT_BY_CLIENT {
            self.by_client.push(chan);
        } else {
            self.by_server.push(chan);
        }
    }
}

/// Which of a session's arenas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The session-scope arena: lives as long as the session.
    Session,
    /// The app-scope arena: one per client app, lives as long as the `SessionServer`, shared by
    /// all that app's sessions.
    App,
}

/// What the master channel hands the session's dispatcher (both run on the library thread, in
/// separate turns: the dispatcher runs the user's handlers outside the master's lock).
enum Event {
    /// The peer opens a channel, before our handlers were installed (the request carries the
    /// channel's fd; the dispatcher answers it).
    Open(MsgIn<Master>),
    /// The peer opened a channel, already accepted (the library thread answered).
    Opened(Box<(transport::Channel, Option<Metadata>)>),
    /// The session is over.
    Error(Error),
}

/// Whether this side takes channels the peer opens: not known until the handlers are
/// installed (requests wait), then yes or no (the library thread answers at once).
const PASSIVE_UNKNOWN: u8 = 0;
const PASSIVE_YES: u8 = 1;
const PASSIVE_NO: u8 = 2;

/// The session's events, waiting for its dispatcher.
struct Events {
    queue: Mutex<VecDeque<Event>>,
    /// Set once the user's handlers are installed (events wait until then).
    dispatcher: OnceLock<Notifier>,
    lends: Arc<Lends>,
}

impl Events {
    /// `e` ends the session: if the peer is gone, what it held and was lent is given back
    /// first (on the server: see `shm::ledger`), so that the error handler finds it done.
    fn ending(&self, e: &Error) {
        if matches!(e, Error::PeerGone) {
            self.lends.peer_gone();
        }
    }

    fn push(&self, ev: Event) {
        if let Event::Error(e) = &ev {
            self.ending(e);
        }
        lock(&self.queue).push_back(ev);
        if let Some(n) = self.dispatcher.get() {
            n.notify();
        }
    }
}

/// The live parts of an open session.
struct Link {
    /// What drives the session: the library thread, or (sync_io) its owner.
    reactor: Arc<Reactor>,
    master: Arc<struc::AsyncChannel<Master>>,
    /// From the master's handlers, and errors a call meets (the call returns it; the error
    /// handler must hear of it too).
    events: Arc<Events>,
    /// The dispatcher's place on the library thread, once the handlers are installed.
    dispatcher: Mutex<Option<Registration>>,
    started: AtomicBool,
    passive: Arc<AtomicU8>,
    /// Set when the session is being dropped: no handler runs any more.
    closing: Arc<AtomicBool>,
}

/// A copy of a session-ending error for the error handler, when a call met it (the call
/// returns the original). `None`: the error does not end the session, or is a derived `Hosed`
/// (the master failed before: whoever met the cause reports it, and a `Hosed` queued ahead of
/// it would take its place as the one report).
fn ending(e: &Error) -> Option<Error> {
    use crate::hosing::HosingError;
    if !e.is_hosing() || matches!(e, Error::Hosed) {
        return None;
    }
    Some(match e {
        Error::PeerGone => Error::PeerGone,
        Error::IdleTimeout => Error::IdleTimeout,
        Error::Protocol(w) => Error::Protocol(w),
        // A channel's or transport's own hosing error (not `Clone`): the session is over.
        _ => Error::Hosed,
    })
}

/// An open session, as either side sees it ([`ClientSession`](super::ClientSession) and
/// [`ServerSession`](super::ServerSession) dereference to it): once open, both sides can do the
/// same things.
///
/// Methods take `&self` and may be called from any thread. The session's handlers run on the
/// process's library thread (shared by every session and async channel): they should not
/// block for long (a blocking [`open_channel`](Session::open_channel) from a handler is fine:
/// the library thread serves the rest while it waits). Dropping the session is synchronous: once it returns no handler
/// of it runs (unless dropped from one of them), its arenas are unmapped, its socket closed
/// (the peer's error handler then fires with [`Error::PeerGone`]).
pub struct Session {
    link: Option<Link>,
    token: u128,
    config: SessionConfig,
    peer_app: String,
    session_arena: Option<Arena>,
    app_arena: Option<Arena>,
    hosed: Arc<AtomicBool>,
    lends: Arc<Lends>,
    pools: Arc<Pools>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("open", &self.link.is_some())
            .field("peer_app", &self.peer_app)
            .field("token", &format_args!("{:032x}", self.token))
            .field("shm", &self.config.shm())
            .field("hosed", &self.is_hosed())
            .finish()
    }
}

impl Session {
    /// A session not open yet (a client before `sync_connect`).
    pub(crate) fn unconnected(config: SessionConfig) -> Session {
        Session {
            link: None,
            token: 0,
            config,
            peer_app: String::new(),
            session_arena: None,
            app_arena: None,
            hosed: Arc::new(AtomicBool::new(false)),
            lends: Arc::new(Lends::server(&(None, None))),
            pools: Arc::new(Pools::new(&(None, None))),
        }
    }

    /// Opens the session over the logged-in master channel (paused): it runs on the library
    /// thread at once (keep-alive, channel-open requests), the user's handlers come with
    /// [`install_handlers`](Session::install_handlers).
    pub(crate) fn open(
        mut core: struc::Channel<Master>,
        token: u128,
        config: SessionConfig,
        peer_app: String,
        arenas: (Option<Arena>, Option<Arena>),
        lends: Lends,
    ) -> Result<Session, Error> {
        // The keep-alive starts with the session: a log-in channel has none, its timers being
        // nobody's to run while it logs in (a due ping's deadline, never cleared, made every
        // wait of the log-in return at once: a spin from the first ping interval on).
        let (ping, idle) = config.keep_alive().unzip();
        core.set_keep_alive(ping, idle);
        let reactor = config.reactor().map_err(Error::Io)?;
        let lends = Arc::new(lends);
        let events = Arc::new(Events {
            queue: Mutex::default(),
            dispatcher: OnceLock::new(),
            lends: lends.clone(),
        });
        let master = Arc::new(struc::AsyncChannel::new(core)?);
        let passive = Arc::new(AtomicU8::new(PASSIVE_UNKNOWN));
        let cfg = config.channel_config();
        let (tx_open, state) = (events.clone(), passive.clone());
        master.expect_msgs(
            MsgType::of::<Master>("openChannel")?,
            move |chan, mut req| {
                let answer = match state.load(Ordering::Acquire) {
                    PASSIVE_UNKNOWN => {
                        tx_open.push(Event::Open(req));
                        return;
                    }
                    PASSIVE_YES => open_request(&mut req, &cfg),
                    _ => None,
                };
                // Answered here, on the library thread: never behind a handler that is itself
                // opening a channel (both sides doing so would wait for each other).
                let mut rsp = chan.create_msg();
                rsp.init_root()
                    .init_open_channel_rsp()
                    .set_accepted(answer.is_some());
                if let Err(e) = chan.send(&mut rsp, Some(&req)) {
                    // (A derived `Hosed`: the cause was reported where it was met.)
                    if e.is_hosing() && !matches!(e, struc::Error::Hosed) {
                        tx_open.push(Event::Error(e.into()));
                        return;
                    }
                }
                if let Some(opened) = answer {
                    tx_open.push(Event::Opened(Box::new(opened)));
                }
            },
        )?;
        // After log-in, the pools either side's arenas grew by come as resources (see `pools`).
        let pools = Arc::new(Pools::new(&arenas));
        let (tx_res, sink) = (events.clone(), pools.clone());
        master.expect_msgs(MsgType::of::<Master>("resource")?, move |_, mut m| {
            let fd = m.take_fd();
            let got = match m.root().and_then(|r| Ok(r.which()?)) {
                Ok(master::Resource(Ok(r))) => sink.received(r.get_kind(), r.get_index(), fd),
                _ => Err(Error::Protocol("unreadable resource")),
            };
            if let Err(e) = got {
                tx_res.push(Event::Error(e));
            }
        })?;
        // Only channel openings and their answers come besides: anything else is dropped.
        for other in ["logIn", "logInRsp"] {
            master.expect_msgs(MsgType::of::<Master>(other)?, |_, _| {})?;
        }
        let tx_err = events.clone();
        master.start_in(&reactor, move |e| tx_err.push(Event::Error(e.into())))?;
        pools.set_master(&master);
        // The pools past 0 of an app-scope arena that grew before this session.
        pools.announce_all()?;
        Ok(Session {
            link: Some(Link {
                reactor,
                master,
                events,
                dispatcher: Mutex::new(None),
                started: AtomicBool::new(false),
                passive,
                closing: Arc::new(AtomicBool::new(false)),
            }),
            token,
            config,
            peer_app,
            session_arena: arenas.0,
            app_arena: arenas.1,
            hosed: Arc::new(AtomicBool::new(false)),
            lends,
            pools,
        })
    }

    /// Has this side's growth of the session's arenas announced to the peer at once (the
    /// client's: see `pools`).
    pub(crate) fn watch_growth(&self) {
        self.pools.watch_growth();
    }

    /// Installs the user's handlers (once): from now on the session is usable, and its events
    /// (including those that came before) reach them, on the library thread.
    pub(crate) fn install_handlers(
        &self,
        on_error: OnError,
        on_passive_open: Option<PassiveOpen>,
    ) -> Result<(), Error> {
        let link = self.link.as_ref().ok_or(Error::NotStarted)?;
        let mut slot = lock(&link.dispatcher);
        if slot.is_some() {
            return Err(Error::AlreadyStarted);
        }
        let takes = on_passive_open.is_some();
        let dispatcher = Arc::new(Dispatcher {
            events: link.events.clone(),
            master: Arc::downgrade(&link.master),
            cfg: self.config.channel_config(),
            handlers: Mutex::new(Handlers {
                on_error: Some(on_error),
                on_passive_open,
                hosing: Hosing::default(),
                hosed: self.hosed.clone(),
                closing: link.closing.clone(),
            }),
        });
        let reg = link.reactor.register(dispatcher);
        let _ = link.events.dispatcher.set(reg.notifier());
        // Events pushed before the notifier was set may have missed the first turn.
        reg.notify();
        *slot = Some(reg);
        link.passive.store(
            if takes { PASSIVE_YES } else { PASSIVE_NO },
            Ordering::Release,
        );
        link.started.store(true, Ordering::Release);
        Ok(())
    }

    /// Returns `e` from a call, and tells the error handler if it ended the session.
    fn report(&self, e: Error) -> Error {
        if let (Some(link), Some(copy)) = (&self.link, ending(&e)) {
            link.events.push(Event::Error(copy));
        }
        e
    }

    fn link(&self) -> Result<&Link, Error> {
        match &self.link {
            Some(l) if l.started.load(Ordering::Acquire) => Ok(l),
            _ => Err(Error::NotStarted),
        }
    }

    /// Whether the session is open: connected (client) or handlers installed (server).
    pub fn is_open(&self) -> bool {
        self.link().is_ok()
    }

    /// Whether the session is over (its error handler has been called or is being called).
    pub fn is_hosed(&self) -> bool {
        self.hosed.load(Ordering::Acquire)
    }

    /// The session's token: random, made by the server at log-in; every structured channel made
    /// with [`structured`](Session::structured) carries it in each message and refuses
    /// messages without it.
    pub fn token(&self) -> u128 {
        self.token
    }

    /// The name of the app on the other side.
    pub fn peer_app(&self) -> &str {
        &self.peer_app
    }

    /// The session's configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Opens a channel: the peer's passive-open handler gets the other end (and `metadata`).
    /// Waits for the peer's answer (up to the configured open timeout). Not fatal when it fails:
    /// [`Error::PassiveOpenRejected`] if the peer has no passive-open handler,
    /// [`Error::OpenTimeout`] without an answer. From a handler (on the library thread) the
    /// library thread serves the other channels and sessions while this waits; in a sync_io
    /// session this call drives the session while it waits.
    pub fn open_channel(&self, metadata: Option<&Metadata>) -> Result<transport::Channel, Error> {
        let mut opts = OpenOptions::new();
        opts.metadata = metadata.cloned();
        self.open_channel_with(&opts)
    }

    /// [`open_channel`](Session::open_channel) with options: metadata, and this end's
    /// keep-alive.
    pub fn open_channel_with(&self, opts: &OpenOptions) -> Result<transport::Channel, Error> {
        let link = self.link()?;
        let (mine, mut req) = self.open_request(link, opts)?;
        let rsp = link
            .master
            .sync_request(&mut req, None, Some(self.config.open_timeout()))
            .map_err(|e| match e {
                struc::Error::Timeout => Error::OpenTimeout,
                e => self.report(e.into()),
            })?;
        drop(req); // our copy of the peer's end
        opened(&rsp, mine, self.open_config(opts))
    }

    /// The non-blocking form of [`open_channel_with`](Session::open_channel_with) (for the
    /// async faces): `done` gets the channel (or why not) when the answer comes, on the thread
    /// that drives the session. If the session ends first, `done` is dropped uncalled. Undo
    /// with [`abandon_open`](Session::abandon_open) (a late answer is then dropped, and the
    /// channel with it).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn start_open(
        &self,
        opts: &OpenOptions,
        done: impl FnOnce(Result<transport::Channel, Error>) + Send + 'static,
    ) -> Result<struc::ReqId, Error> {
        let link = self.link()?;
        let (mine, mut req) = self.open_request(link, opts)?;
        let cfg = self.open_config(opts);
        let mut done = Some(done);
        let mut mine = Some(mine);
        link.master
            .async_request(&mut req, None, struc::Expect::OneOff, move |_, rsp| {
                if let (Some(done), Some(mine)) = (done.take(), mine.take()) {
                    done(opened(&rsp, mine, cfg.clone()));
                }
            })
            .map_err(|e| self.report(e.into()))
    }

    /// Stops waiting for the answer of [`start_open`](Session::start_open).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn abandon_open(&self, req: struc::ReqId) {
        if let Ok(link) = self.link() {
            link.master.abandon_request_any(req);
        }
    }

    /// The request of an opening and our end of the new channel's socket.
    fn open_request(
        &self,
        link: &Link,
        opts: &OpenOptions,
    ) -> Result<(UnixStream, crate::msg::MsgOut<Master>), Error> {
        if self.is_hosed() {
            return Err(Error::Hosed);
        }
        let (mine, theirs) = UnixStream::pair().map_err(Error::Io)?;
        let mut req = link.master.create_msg();
        {
            let mut o = req.init_root().init_open_channel();
            if let Some(m) = &opts.metadata {
                o.set_metadata(m.as_bytes());
            }
        }
        req.set_fd(OwnedFd::from(theirs));
        Ok((mine, req))
    }

    /// The configuration of our end of a channel we open.
    fn open_config(&self, opts: &OpenOptions) -> transport::ChannelConfig {
        let cfg = self.config.channel_config();
        match opts.keep_alive {
            Some(k) => super::config::with_keep_alive(cfg, k),
            None => cfg,
        }
    }

    /// What the session's owner waits for, in a sync_io session (see
    /// [`EventLoop::SyncIo`](super::EventLoop::SyncIo)); nothing for a session the library
    /// thread drives.
    pub(crate) fn interest(&self) -> Interest<'_> {
        match &self.link {
            Some(l) if !l.reactor.is_threaded() => l.reactor.interest(),
            _ => Interest::none(),
        }
    }

    /// Runs what is due of a sync_io session (its handlers among it), without blocking.
    pub(crate) fn drive(&self) {
        if let Some(l) = self.link.as_ref().filter(|l| !l.reactor.is_threaded()) {
            l.reactor.drive();
        }
    }

    /// The reactor of an open session.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn reactor(&self) -> Option<&Arc<Reactor>> {
        self.link.as_ref().map(|l| &l.reactor)
    }

    /// A structured channel over `chan` (one of this session's channels), in the session-scope
    /// arena (a vanilla session: on the heap), carrying the session's token. It reads the peer's
    /// messages in either arena through the session's own mappings.
    pub fn structured<M>(&self, chan: transport::Channel) -> Result<struc::Channel<M>, Error>
    where
        M: Owned + Introspect,
        for<'a> M::Reader<'a>: Into<dynamic_value::Reader<'a>>,
    {
        self.structured_in(chan, Scope::Session)
    }

    /// Like [`structured`](Session::structured), with new messages in the arena of `scope`.
    pub fn structured_in<M>(
        &self,
        chan: transport::Channel,
        scope: Scope,
    ) -> Result<struc::Channel<M>, Error>
    where
        M: Owned + Introspect,
        for<'a> M::Reader<'a>: Into<dynamic_value::Reader<'a>>,
    {
        let backing = match self.arena(scope) {
            Ok(a) => Backing::Shm(a.clone()),
            Err(_) => Backing::Heap,
        };
        let mut msgs = MsgChannel::new(chan, backing).with_session_token(self.token);
        for a in self.arenas().into_iter().flatten() {
            msgs = msgs.with_arena(a);
        }
        Ok(struc::Channel::from_msg_channel(msgs)?)
    }

    /// The arena of `scope` ([`Error::NoArena`] in a vanilla session).
    pub fn arena(&self, scope: Scope) -> Result<&Arena, Error> {
        match scope {
            Scope::Session => self.session_arena.as_ref(),
            Scope::App => self.app_arena.as_ref(),
        }
        .ok_or(Error::NoArena)
    }

    /// Lends `handle` (an object in one of the session's arenas) to the peer: send the blob any
    /// way you like; the peer's [`borrow_object`](Session::borrow_object) turns it into a handle
    /// to the same object. The blob says which arena.
    ///
    /// If the client dies, the server gives back what the client held and the lends it never
    /// adopted (see [the module docs](super#when-a-client-dies)); lend and borrow through the
    /// session for that to be exact. A server's lend to a client whose death was settled is
    /// refused ([`Error::Hosed`]).
    pub fn lend_object<T: ShmSafe>(&self, handle: &ShmHandle<T>) -> Result<LendBlob, Error> {
        let id = handle.arena().id();
        if !self.arenas()?.any(|a| a.id() == id) {
            return Err(Error::ForeignArena);
        }
        // The pool goes to the peer before the blob can (see `pools`).
        self.pools
            .announce(handle.arena())
            .map_err(|e| self.report(e))?;
        self.lends.lend(handle)
    }

    /// Borrows the object the peer lent (see [`lend_object`](Session::lend_object)). A dead
    /// client's lends that the server had not borrowed when it learned of the death were given
    /// back: borrowing one then fails ([`shm::Error::Stale`](crate::shm::Error::Stale)).
    pub fn borrow_object<T: ShmSafe>(&self, blob: &LendBlob) -> Result<ShmHandle<T>, Error> {
        let arena = self
            .arenas()?
            .find(|a| a.id() as u32 == blob.arena_tag())
            .ok_or(Error::Shm(crate::shm::Error::ForeignBlob))?;
        match self.lends.borrow(arena, blob) {
            // A pool the peer made: its announcement is on its way on the master channel.
            Err(Error::Shm(crate::shm::Error::UnknownPool(id)))
                if self.pools.wait_for(
                    arena,
                    id,
                    std::time::Instant::now() + self.config.open_timeout(),
                ) =>
            {
                self.lends.borrow(arena, blob)
            }
            r => r,
        }
    }

    /// The session's arenas (session scope, then app scope); [`Error::NoArena`] in a vanilla
    /// session.
    fn arenas(&self) -> Result<impl Iterator<Item = &Arena>, Error> {
        if self.session_arena.is_none() && self.app_arena.is_none() {
            return Err(Error::NoArena);
        }
        Ok(self.session_arena.iter().chain(self.app_arena.iter()))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The client's ledger closes before its socket does: the server, seeing the end, then
        // knows the client lives on with what it holds.
        self.lends.close();
        let Some(link) = self.link.take() else {
            return;
        };
        // Off the library thread, the master first, then the dispatcher: once each drop
        // returns, no turn of theirs runs (unless dropped from a handler, on that thread: the
        // running turn then ends by itself, `closing` keeping the handlers quiet).
        link.closing.store(true, Ordering::Release);
        let Link {
            master, dispatcher, ..
        } = link;
        drop(master);
        drop(dispatcher);
    }
}

/// Options of [`Session::open_channel_with`].
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    metadata: Option<Metadata>,
    keep_alive: Option<Option<(std::time::Duration, std::time::Duration)>>,
}

impl OpenOptions {
    /// No metadata; the session's [channel keep-alive](SessionConfig::with_channel_keep_alive).
    pub fn new() -> Self {
        Self::default()
    }

    /// Metadata for the peer's passive-open handler.
    pub fn metadata(mut self, m: Metadata) -> Self {
        self.metadata = Some(m);
        self
    }

    /// `(ping period, idle timeout)` of our end of this channel (`None`: none), instead of
    /// the session's [channel keep-alive](SessionConfig::with_channel_keep_alive).
    pub fn keep_alive(mut self, k: Option<(std::time::Duration, std::time::Duration)>) -> Self {
        self.keep_alive = Some(k);
        self
    }
}

/// The channel an accepted opening makes of `mine`, from the peer's answer `rsp`.
fn opened(
    rsp: &MsgIn<Master>,
    mine: UnixStream,
    cfg: transport::ChannelConfig,
) -> Result<transport::Channel, Error> {
    let accepted = match rsp.root().and_then(|r| Ok(r.which()?)) {
        Ok(master::OpenChannelRsp(Ok(r))) => r.get_accepted(),
        _ => {
            return Err(Error::Protocol(
                "the answer to openChannel is not openChannelRsp",
            ))
        }
    };
    if !accepted {
        return Err(Error::PassiveOpenRejected);
    }
    Ok(transport::Channel::from_stream(mine, cfg)?)
}

/// The channel a peer's `openChannel` request carries, and its metadata (`None`: no usable fd).
fn open_request(
    req: &mut MsgIn<Master>,
    cfg: &transport::ChannelConfig,
) -> Option<(transport::Channel, Option<Metadata>)> {
    let fd = req.take_fd()?;
    let mdt = match req.root().and_then(|r| Ok(r.which()?)) {
        Ok(master::OpenChannel(Ok(o))) => Metadata::from_wire(o.get_metadata().ok()?).ok()?,
        _ => return None,
    };
    let chan = transport::Channel::from_stream(UnixStream::from(fd), cfg.clone()).ok()?;
    Some((chan, mdt))
}

/// The user's handlers, run by the dispatcher.
struct Handlers {
    on_error: Option<OnError>,
    on_passive_open: Option<PassiveOpen>,
    /// The session's hosing state (the library's one state machine), kept here where the
    /// errors are reported ...
    hosing: Hosing,
    /// ... and published for `Session::is_hosed` on other threads.
    hosed: Arc<AtomicBool>,
    closing: Arc<AtomicBool>,
}

impl Handlers {
    /// Reports `e` (an error that ends the session) to the error handler, if it is the first.
    fn error(&mut self, e: Error) {
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        if let Report::First(e) = self.hosing.report(e) {
            self.hosed.store(true, Ordering::Release);
            if let Some(h) = self.on_error.take() {
                h(e);
            }
        }
    }

    fn opened(&mut self, chan: transport::Channel, mdt: Option<Metadata>) {
        if self.hosing.is_hosed() || self.closing.load(Ordering::Acquire) {
            return; // over
        }
        if let Some(h) = self.on_passive_open.as_mut() {
            h(chan, mdt);
        }
    }
}

/// The session's dispatcher: runs the user's handlers on the library thread, outside every lock
/// of the library's but its own (so they may call the session), and answers the channel
/// openings that came before them.
struct Dispatcher {
    events: Arc<Events>,
    master: Weak<struc::AsyncChannel<Master>>,
    cfg: transport::ChannelConfig,
    /// Only the library thread takes this, for a turn.
    handlers: Mutex<Handlers>,
}

impl Source for Dispatcher {
    fn on_ready(&self) -> Wait {
        let mut h = lock(&self.handlers);
        loop {
            let ev = lock(&self.events.queue).pop_front();
            match ev {
                None => return Wait::idle(),
                Some(ev) => self.handle(ev, &mut h),
            }
        }
    }
}

impl Dispatcher {
    fn handle(&self, ev: Event, h: &mut Handlers) {
        match ev {
            Event::Error(e) => h.error(e),
            Event::Opened(opened) => {
                let (chan, mdt) = *opened;
                h.opened(chan, mdt)
            }
            Event::Open(mut req) => {
                let answer = if h.on_passive_open.is_some() && h.on_error.is_some() {
                    open_request(&mut req, &self.cfg)
                } else {
                    None
                };
                let Some(master) = self.master.upgrade() else {
                    return;
                };
                let mut rsp = master.create_msg();
                rsp.init_root()
                    .init_open_channel_rsp()
                    .set_accepted(answer.is_some());
                let sent = master.send(&mut rsp, Some(&req));
                drop(master);
                match sent {
                    // A derived `Hosed` (the master failed before) is not the cause: that was
                    // queued by whoever met it, and is reported from there.
                    Err(e) if e.is_hosing() => {
                        let e = Error::from(e);
                        if !matches!(e, Error::Hosed) {
                            self.events.ending(&e);
                            h.error(e);
                        }
                    }
                    _ => {
                        if let Some((chan, mdt)) = answer {
                            h.opened(chan, mdt);
                        }
                    }
                }
            }
        }
    }
}
