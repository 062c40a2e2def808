//! What both sides of an open session can do: open channels, make structured channels, reach the
//! arenas, lend and borrow objects.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;

use capnp::dynamic_value;
use capnp::introspect::Introspect;
use capnp::traits::Owned;

use super::{Error, Metadata, SessionConfig};
use crate::msg::{Backing, MsgChannel, MsgIn};
use crate::schemas::session_capnp::master;
use crate::shm::{Arena, LendBlob, ShmHandle, ShmSafe};
use crate::struc::{self, MsgType};
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

/// Which of a session's arenas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The session-scope arena: lives as long as the session.
    Session,
    /// The app-scope arena: one per client app, lives as long as the `SessionServer`, shared by
    /// all that app's sessions.
    App,
}

/// What the master channel's library thread hands the session's handler thread.
enum Event {
    /// The peer opens a channel (the request carries the channel's fd).
    Open(MsgIn<Master>),
    /// The session is over.
    Error(Error),
}

/// The live parts of an open session.
struct Link {
    master: Arc<struc::AsyncChannel<Master>>,
    /// Events wait here until the user's handlers are installed.
    events: Mutex<Option<mpsc::Receiver<Event>>>,
    handler_thread: Mutex<Option<JoinHandle<()>>>,
    started: AtomicBool,
}

/// An open session, as either side sees it ([`ClientSession`](super::ClientSession) and
/// [`ServerSession`](super::ServerSession) dereference to it): once open, both sides can do the
/// same things.
///
/// Methods take `&self` and may be called from any thread. Dropping the session is synchronous:
/// its threads are joined, its arenas unmapped, its socket closed (the peer's error handler then
/// fires with [`Error::PeerGone`]).
pub struct Session {
    link: Option<Link>,
    token: u128,
    config: SessionConfig,
    peer_app: String,
    session_arena: Option<Arena>,
    app_arena: Option<Arena>,
    hosed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("open", &self.link.is_some())
            .field("peer_app", &self.peer_app)
            .field("token", &format_args!("{:032x}", self.token))
            .field("shm", &self.config.get_shm())
            .field("hosed", &self.is_hosed())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        }
    }

    /// Opens the session over the logged-in master channel (paused): its library thread starts
    /// at once (keep-alive, channel-open requests), the user's handlers come with
    /// [`install_handlers`](Session::install_handlers).
    pub(crate) fn open(
        core: struc::Channel<Master>,
        token: u128,
        config: SessionConfig,
        peer_app: String,
        arenas: (Option<Arena>, Option<Arena>),
    ) -> Result<Session, Error> {
        let (tx, rx) = mpsc::channel();
        let master = Arc::new(struc::AsyncChannel::new(core)?);
        let open_type = MsgType::of::<Master>("openChannel")?;
        let tx_open = tx.clone();
        master.expect_msgs(open_type, move |_, req| {
            let _ = tx_open.send(Event::Open(req));
        })?;
        master.start(move |e| {
            let _ = tx.send(Event::Error(e.into()));
        })?;
        Ok(Session {
            link: Some(Link {
                master,
                events: Mutex::new(Some(rx)),
                handler_thread: Mutex::new(None),
                started: AtomicBool::new(false),
            }),
            token,
            config,
            peer_app,
            session_arena: arenas.0,
            app_arena: arenas.1,
            hosed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Installs the user's handlers (once): from now on the session is usable, and its events
    /// (including those that came before) reach them, on a thread of the session's.
    pub(crate) fn install_handlers(
        &self,
        on_error: OnError,
        on_passive_open: Option<PassiveOpen>,
    ) -> Result<(), Error> {
        let link = self.link.as_ref().ok_or(Error::NotStarted)?;
        let Some(events) = lock(&link.events).take() else {
            return Err(Error::AlreadyStarted);
        };
        let master = Arc::downgrade(&link.master);
        let hosed = self.hosed.clone();
        let cfg = self.config.channel_config();
        let thread = std::thread::Builder::new()
            .name("flowipc-session".into())
            .spawn(move || handle_events(events, master, hosed, cfg, on_error, on_passive_open))
            .map_err(Error::Io)?;
        *lock(&link.handler_thread) = Some(thread);
        link.started.store(true, Ordering::Release);
        Ok(())
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
    /// [`Error::OpenTimeout`] without an answer.
    pub fn open_channel(&self, metadata: Option<&Metadata>) -> Result<transport::Channel, Error> {
        let link = self.link()?;
        if self.is_hosed() {
            return Err(Error::Hosed);
        }
        let (mine, theirs) = UnixStream::pair().map_err(Error::Io)?;
        let mut req = link.master.create_msg();
        {
            let mut o = req.init_root().init_open_channel();
            if let Some(m) = metadata {
                o.set_metadata(m.as_bytes());
            }
        }
        req.set_fd(OwnedFd::from(theirs));
        let rsp = link
            .master
            .sync_request(&mut req, None, Some(self.config.get_open_timeout()))
            .map_err(|e| match e {
                struc::Error::Timeout => Error::OpenTimeout,
                e => e.into(),
            })?;
        drop(req); // our copy of the peer's end
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
        Ok(transport::Channel::from_stream(
            mine,
            self.config.channel_config(),
        )?)
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
        for a in self.session_arena.iter().chain(self.app_arena.iter()) {
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
    pub fn lend_object<T: ShmSafe>(&self, handle: &ShmHandle<T>) -> Result<LendBlob, Error> {
        let id = handle.arena().id();
        let mut ours = self.session_arena.iter().chain(self.app_arena.iter());
        if self.session_arena.is_none() && self.app_arena.is_none() {
            return Err(Error::NoArena);
        }
        if ours.any(|a| a.id() == id) {
            Ok(handle.lend())
        } else {
            Err(Error::ForeignArena)
        }
    }

    /// Borrows the object the peer lent (see [`lend_object`](Session::lend_object)).
    pub fn borrow_object<T: ShmSafe>(&self, blob: &LendBlob) -> Result<ShmHandle<T>, Error> {
        if self.session_arena.is_none() && self.app_arena.is_none() {
            return Err(Error::NoArena);
        }
        let arena = self
            .session_arena
            .iter()
            .chain(self.app_arena.iter())
            .find(|a| a.id() as u32 == blob.arena_tag())
            .ok_or(Error::Shm(crate::shm::Error::ForeignBlob))?;
        Ok(arena.borrow(blob)?)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let Some(link) = self.link.take() else {
            return;
        };
        // The master's thread first (joined by the channel's drop); that drops its handlers and
        // with them the event senders, which ends the handler thread.
        let Link {
            master,
            events,
            handler_thread,
            ..
        } = link;
        drop(master);
        drop(events);
        let thread = handler_thread
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(t) = thread {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// The session's handler thread: runs the user's handlers, outside every lock of the library's
/// (so they may call the session).
fn handle_events(
    events: mpsc::Receiver<Event>,
    master: Weak<struc::AsyncChannel<Master>>,
    hosed: Arc<AtomicBool>,
    cfg: transport::ChannelConfig,
    on_error: OnError,
    mut on_passive_open: Option<PassiveOpen>,
) {
    let mut on_error = Some(on_error);
    for ev in events {
        match ev {
            Event::Error(e) => {
                if let Some(h) = on_error.take() {
                    hosed.store(true, Ordering::Release);
                    h(e);
                }
            }
            Event::Open(mut req) => {
                if on_error.is_none() {
                    continue; // over
                }
                let Some(master) = master.upgrade() else {
                    return;
                };
                let fd = req.take_fd();
                let mdt = match req.root().and_then(|r| Ok(r.which()?)) {
                    Ok(master::OpenChannel(Ok(o))) => o
                        .get_metadata()
                        .ok()
                        .and_then(|b| Metadata::from_wire(b).ok())
                        .flatten(),
                    _ => None,
                };
                let chan = match (&on_passive_open, fd) {
                    (Some(_), Some(fd)) => {
                        transport::Channel::from_stream(UnixStream::from(fd), cfg.clone()).ok()
                    }
                    _ => None,
                };
                let mut rsp = master.create_msg();
                rsp.init_root()
                    .init_open_channel_rsp()
                    .set_accepted(chan.is_some());
                let _ = master.send(&mut rsp, Some(&req));
                drop(master);
                if let (Some(h), Some(chan)) = (on_passive_open.as_mut(), chan) {
                    h(chan, mdt);
                }
            }
        }
    }
}
