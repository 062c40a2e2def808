//! The client side: [`ClientSession`].

use std::collections::BTreeMap;
use std::ops::Deref;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::core::{Master, OnError, PassiveOpen};
use super::lends::Lends;
use super::proto::{self, PROTOCOL_VERSION};
use super::{
    ClientApp, Error, InitChannels, Metadata, Rejection, ServerApp, Session, SessionConfig, ShmKind,
};
use crate::msg::{Backing, MsgIn};
use crate::poll::{Interest, Pollable};
use crate::schemas::session_capnp::{log_in_rsp, master};
use crate::shm::Arena;
use crate::struc::{self, MsgType};
use crate::sync::lock;
use crate::sys;
use crate::transport;

/// The advanced form of connecting: init channels and metadata.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    init_channels: u32,
    metadata: Option<Metadata>,
}

impl ConnectOptions {
    /// No init channels, no metadata (what [`sync_connect`](ClientSession::sync_connect) does).
    pub fn new() -> Self {
        Self::default()
    }

    /// How many channels to open at log-in, ready when `sync_connect_with` returns (at most
    /// [`MAX_INIT_CHANNELS`](super::MAX_INIT_CHANNELS)).
    pub fn init_channels(mut self, n: u32) -> Self {
        self.init_channels = n;
        self
    }

    /// Metadata for the server (its init-channel and metadata callbacks see it).
    pub fn metadata(mut self, m: Metadata) -> Self {
        self.metadata = Some(m);
        self
    }
}

/// One session, client side. Construct it, then [`sync_connect`](ClientSession::sync_connect)
/// (retrying while the server is absent); once connected it dereferences to an open
/// [`Session`].
///
/// ```no_run
/// use std::time::Duration;
/// use flowipc::session::{App, ClientApp, ClientSession, Error, ServerApp};
///
/// let cli = ClientApp::new(App::new("b", "/usr/bin/app_b", 1000, 1000));
/// let srv = ServerApp::new(App::new("a", "/usr/bin/app_a", 1000, 1000), ["b"]);
/// let mut session = ClientSession::new(&cli, &srv, |e| eprintln!("session over: {e}"));
/// loop {
///     match session.sync_connect() {
///         Ok(()) => break,
///         // The server is not running (yet): try again in a while.
///         Err(Error::ServerAbsent(_)) => std::thread::sleep(Duration::from_millis(500)),
///         Err(e) => return Err(e),
///     }
/// }
/// let chan = session.open_channel(None)?;
/// # Ok::<(), Error>(())
/// ```
pub struct ClientSession {
    own: ClientApp,
    server: ServerApp,
    /// The handlers, until connected (in a `Mutex` only so that the session is `Sync`).
    on_error: std::sync::Mutex<Option<OnError>>,
    on_passive_open: std::sync::Mutex<Option<PassiveOpen>>,
    session: Session,
    init: InitChannels,
    server_metadata: Option<Metadata>,
    /// A log-in in progress (sync_io: `start_connect`).
    connecting: Option<Box<Connecting>>,
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("own", &self.own.name)
            .field("server", &self.server.name)
            .field("session", &self.session)
            .finish()
    }
}

impl ClientSession {
    /// A session of client app `own` with server app `server` (both from the universe
    /// description). `on_error` fires once when the connected session is over (the server gone,
    /// or silent past the idle timeout). The server cannot open channels to this side.
    pub fn new(
        own: &ClientApp,
        server: &ServerApp,
        on_error: impl FnOnce(Error) + Send + 'static,
    ) -> ClientSession {
        ClientSession {
            own: own.clone(),
            server: server.clone(),
            on_error: std::sync::Mutex::new(Some(Box::new(on_error))),
            on_passive_open: std::sync::Mutex::new(None),
            session: Session::unconnected(SessionConfig::new()),
            init: InitChannels::default(),
            server_metadata: None,
            connecting: None,
        }
    }

    /// [`new`](ClientSession::new), and `on_passive_open` gets each channel the server opens,
    /// with its metadata (on a thread of the session's).
    pub fn with_passive_open(
        own: &ClientApp,
        server: &ServerApp,
        on_error: impl FnOnce(Error) + Send + 'static,
        on_passive_open: impl FnMut(transport::Channel, Option<Metadata>) + Send + 'static,
    ) -> ClientSession {
        let mut s = ClientSession::new(own, server, on_error);
        *s.on_passive_open
            .get_mut()
            .unwrap_or_else(|e| e.into_inner()) = Some(Box::new(on_passive_open));
        s
    }

    /// Sets the configuration (see [`SessionConfig`]). Call it before connecting: on a
    /// connected session it ends the session (a new, unconnected one takes its place).
    pub fn config(mut self, config: SessionConfig) -> Self {
        self.connecting = None;
        self.session = Session::unconnected(config);
        self
    }

    /// Connects and logs in. Returns at once with [`Error::ServerAbsent`] when no server runs
    /// (or it went away during log-in): retry later. A refused log-in is [`Error::LogInRejected`] (the server says why).
    pub fn sync_connect(&mut self) -> Result<(), Error> {
        self.sync_connect_with(ConnectOptions::new())
    }

    /// [`sync_connect`](ClientSession::sync_connect) with init channels and metadata; take them
    /// with [`take_init_channels`](ClientSession::take_init_channels) and
    /// [`server_metadata`](ClientSession::server_metadata).
    pub fn sync_connect_with(&mut self, opts: ConnectOptions) -> Result<(), Error> {
        if self.session.is_open() {
            return Err(Error::AlreadyStarted);
        }
        if self.connecting.is_some() {
            return Err(Error::AlreadyStarted);
        }
        self.connect(opts).map_err(absent)
    }

    fn connect(&mut self, opts: ConnectOptions) -> Result<(), Error> {
        let mut c = self.start_log_in(opts)?;
        while !c.step()? {
            crate::poll::wait(c.interest(), true, None).map_err(Error::Io)?;
        }
        let opened = c.into_opened()?;
        self.finish(opened)
    }

    /// Starts connecting without waiting (for a sync_io session, see
    /// [`EventLoop::SyncIo`](super::EventLoop::SyncIo)): each
    /// [`on_ready`](crate::poll::Pollable::on_ready) takes the log-in a step further, until the
    /// session [`is_open`](Session::is_open) or `on_ready` returns why not (then it may be
    /// started again). [`Error::ServerAbsent`] at once if no server runs.
    pub fn start_connect(&mut self, opts: ConnectOptions) -> Result<(), Error> {
        if self.session.is_open() || self.connecting.is_some() {
            return Err(Error::AlreadyStarted);
        }
        let c = self.start_log_in(opts).map_err(absent)?;
        self.connecting = Some(Box::new(c));
        Ok(())
    }

    /// Whether a connection started by [`start_connect`](ClientSession::start_connect) is
    /// still logging in.
    pub fn is_connecting(&self) -> bool {
        self.connecting.is_some()
    }

    /// What a log-in in progress waits for.
    pub(crate) fn connecting(&self) -> Option<Interest<'_>> {
        self.connecting.as_ref().map(|c| c.interest())
    }

    pub(super) fn session(&self) -> &Session {
        &self.session
    }

    /// Abandons a log-in in progress (its connection closes).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn cancel_connect(&mut self) {
        self.connecting = None;
    }

    /// A step of the log-in started by `start_connect`: `Ok(true)` once open.
    pub(crate) fn step_connect(&mut self) -> Result<bool, Error> {
        let Some(c) = self.connecting.as_mut() else {
            return Ok(self.session.is_open());
        };
        match c.step() {
            Ok(false) => Ok(false),
            Ok(true) => {
                let c = self.connecting.take().expect("connecting");
                let opened = c.into_opened().map_err(absent)?;
                self.finish(opened).map_err(absent)?;
                Ok(true)
            }
            Err(e) => {
                self.connecting = None;
                Err(absent(e))
            }
        }
    }

    fn start_log_in(&self, opts: ConnectOptions) -> Result<Connecting, Error> {
        self.own.validate()?;
        self.server.validate()?;
        let config = self.session.config().clone();
        let stream = self.reach_server()?;
        let chan = transport::Channel::from_stream(stream, config.log_in_config())?;
        let mut core = struc::Channel::<Master>::new(chan, Backing::Heap)?;
        core.start(|_| {})?;
        let (pid, uid) = (std::process::id() as i32, sys::effective_ids());
        let mut req = core.create_msg();
        {
            let mut l = req.init_root().init_log_in();
            l.set_protocol_version(PROTOCOL_VERSION);
            l.set_client_app(self.own.name.as_str());
            l.set_server_app(self.server.name.as_str());
            l.set_pid(pid);
            l.set_uid(uid.0);
            l.set_gid(uid.1);
            let mut c = l.reborrow().init_config();
            c.set_shm_kind(config.shm_code());
            c.set_channel_kind(config.channel_code());
            c.set_native_handles(config.native_handles());
            l.set_init_channels(opts.init_channels);
            if let Some(m) = &opts.metadata {
                l.set_metadata(m.as_bytes());
            }
        }
        let deadline = Instant::now() + config.log_in_timeout();
        let rsp: Arc<Mutex<Option<MsgIn<Master>>>> = Arc::default();
        let slot = rsp.clone();
        core.async_request(&mut req, None, struc::Expect::OneOff, move |_, m| {
            *lock(&slot) = Some(m)
        })?;
        let fd = core
            .interest()
            .read_fd()
            .ok_or(Error::Hosed)?
            .try_clone_to_owned()
            .map_err(Error::Io)?;
        Ok(Connecting {
            wants_write: core.wants_write(),
            core: Mutex::new(core),
            fd,
            n_cli: opts.init_channels,
            config,
            deadline,
            rsp,
            accepted: None,
        })
    }

    /// The session, once logged in: opened over the log-in's channel, handlers installed.
    fn finish(&mut self, o: Opened) -> Result<(), Error> {
        let Opened {
            core,
            token,
            arenas,
            init,
            server_metadata,
            config,
        } = o;
        let lends = Lends::client(&arenas)?;
        let session = Session::open(core, token, config, self.server.name.clone(), arenas, lends)?;
        let on_error = self
            .on_error
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| Box::new(|_| {}) as OnError);
        let on_passive_open = self
            .on_passive_open
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        session.watch_growth();
        session.install_handlers(on_error, on_passive_open)?;
        self.session = session;
        self.init = init;
        self.server_metadata = server_metadata;
        Ok(())
    }

    /// Finds the live server: its PID file, its socket, and checks that the process on the
    /// socket is the server app.
    fn reach_server(&self) -> Result<UnixStream, Error> {
        let pid_text =
            std::fs::read_to_string(self.server.pid_file()).map_err(Error::ServerAbsent)?;
        let pid: i32 = pid_text.trim().parse().map_err(|_| {
            Error::ServerAbsent(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "PID file being written or garbled",
            ))
        })?;
        let stream = UnixStream::connect(self.server.socket_path()).map_err(Error::ServerAbsent)?;
        // For a connected socket, SO_PEERCRED is the listener's process.
        let creds = sys::peer_credentials(stream.as_fd()).map_err(Error::Io)?;
        if creds.pid != pid {
            return Err(Error::ServerAbsent(std::io::Error::other(
                "the PID file names another process than the socket's (server restarting?)",
            )));
        }
        if (creds.uid, creds.gid) != (self.server.uid, self.server.gid) {
            return Err(Error::ServerIdentity(format!(
                "it runs as uid {} gid {}; server app {:?} is uid {} gid {}",
                creds.uid, creds.gid, self.server.name, self.server.uid, self.server.gid
            )));
        }
        proto::check_exe(creds.pid, &self.server.exec_path).map_err(Error::ServerIdentity)?;
        Ok(stream)
    }

    /// Takes the init channels (see [`InitChannels`]); later calls get none.
    pub fn take_init_channels(&mut self) -> InitChannels {
        std::mem::take(&mut self.init)
    }

    /// The server's log-in metadata, if it sent some.
    pub fn server_metadata(&self) -> Option<&Metadata> {
        self.server_metadata.as_ref()
    }

    /// Our own app.
    pub fn client_app(&self) -> &ClientApp {
        &self.own
    }

    /// The server app.
    pub fn server_app(&self) -> &ServerApp {
        &self.server
    }
}

impl Deref for ClientSession {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.session
    }
}

/// The server went away before the session existed (it was stopping, or closed a connection
/// past its limit of pending log-ins): as good as absent; retry.
fn absent(e: Error) -> Error {
    match e {
        Error::PeerGone => Error::ServerAbsent(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "the server closed the connection during log-in",
        )),
        e => e,
    }
}

/// A log-in in progress, client side, a step at a time.
struct Connecting {
    /// (In a `Mutex` only so that the session is `Sync`: the log-in has one owner.)
    core: Mutex<struc::Channel<Master>>,
    /// A copy of the log-in socket's fd, what the log-in waits for (the core is behind the
    /// lock) ...
    fd: OwnedFd,
    /// ... for writing too when the core has bytes to write. (No timer of the core's: a log-in
    /// channel has no keep-alive, see `SessionConfig::log_in_config`.)
    wants_write: bool,
    config: SessionConfig,
    n_cli: u32,
    deadline: Instant,
    /// The answer to the log-in request, once it came.
    rsp: Arc<Mutex<Option<MsgIn<Master>>>>,
    /// What the server's answer said, and the resources that came.
    accepted: Option<Accepted>,
}

struct Accepted {
    token: u128,
    n_srv: u32,
    with_arenas: bool,
    server_metadata: Option<Metadata>,
    got: BTreeMap<(u8, u32), OwnedFd>,
}

/// What a finished log-in gives the session.
struct Opened {
    core: struc::Channel<Master>,
    token: u128,
    arenas: (Option<Arena>, Option<Arena>),
    init: InitChannels,
    server_metadata: Option<Metadata>,
    config: SessionConfig,
}

impl Connecting {
    /// What the log-in waits for: its socket, and its deadline.
    fn interest(&self) -> Interest<'_> {
        let fd = Some(self.fd.as_fd());
        Interest::new(fd, fd.filter(|_| self.wants_write), Some(self.deadline))
    }

    /// Takes the log-in as far as it can without waiting: `true` once everything came (then
    /// [`into_opened`](Connecting::into_opened)).
    fn step(&mut self) -> Result<bool, Error> {
        let core = self.core.get_mut().unwrap_or_else(|e| e.into_inner());
        let r = Self::advance(
            core,
            self.n_cli,
            &self.config,
            &self.rsp,
            &mut self.accepted,
        );
        self.wants_write = core.wants_write();
        match r? {
            true => Ok(true),
            // The server ended its sending before the log-in was whole (everything it sent
            // before its end was read above): nothing more will come, and its socket, at its
            // end, would stay readable for every wait.
            false if core.is_peer_ended() => Err(Error::PeerGone),
            false if Instant::now() >= self.deadline => Err(Error::LogInTimeout),
            false => Ok(false),
        }
    }

    fn advance(
        core: &mut struc::Channel<Master>,
        n_cli: u32,
        config: &SessionConfig,
        rsp: &Mutex<Option<MsgIn<Master>>>,
        accepted: &mut Option<Accepted>,
    ) -> Result<bool, Error> {
        if accepted.is_none() {
            core.flush()?;
            // (An event at a time: the resources, and perhaps the end, follow the answer.)
            while lock(rsp).is_none() && core.step_ready()? {}
            let Some(rsp) = lock(rsp).take() else {
                return Ok(false);
            };
            *accepted = Some(read_answer(&rsp, n_cli, config)?);
        }
        let a = accepted.as_mut().expect("set above");
        // The resources came after the response: they wait in the channel's cache.
        let resource_type = MsgType::of::<Master>("resource")?;
        // (A channel opening may follow them at once: that one waits for the session.)
        let others = proto::types(&["logIn", "logInRsp"])?;
        let expected = n_cli as usize + a.n_srv as usize + if a.with_arenas { 2 } else { 0 };
        while a.got.len() < expected {
            let Some(mut m) = proto::poll_for(core, resource_type, &others)? else {
                return Ok(false);
            };
            let fd = m
                .take_fd()
                .ok_or(Error::Protocol("resource without its fd"))?;
            let key = match m.root().and_then(|r| Ok(r.which()?)) {
                Ok(master::Resource(Ok(r))) => (r.get_kind(), r.get_index()),
                _ => return Err(Error::Protocol("unreadable resource")),
            };
            let in_range = match key.0 {
                proto::RES_SESSION_ARENA | proto::RES_APP_ARENA => a.with_arenas && key.1 == 0,
                proto::RES_INIT_BY_CLIENT => key.1 < n_cli,
                proto::RES_INIT_BY_SERVER => key.1 < a.n_srv,
                _ => false,
            };
            if !in_range || a.got.insert(key, fd).is_some() {
                return Err(Error::Protocol("unexpected or repeated resource"));
            }
        }
        Ok(true)
    }

    /// The parts of the session, once [`step`](Connecting::step) said done.
    fn into_opened(self) -> Result<Opened, Error> {
        let Connecting {
            core,
            config,
            accepted,
            ..
        } = self;
        let mut core = core.into_inner().unwrap_or_else(|e| e.into_inner());
        let a = accepted.ok_or(Error::NotStarted)?;
        let mut got = a.got;
        // (The other pools of a grown arena come once the session is open: see `pools`.)
        let join = |fd: OwnedFd| Arena::join([fd], config.arena_config());
        let arenas = match (
            got.remove(&(proto::RES_SESSION_ARENA, 0)),
            got.remove(&(proto::RES_APP_ARENA, 0)),
        ) {
            (Some(s), Some(a)) => (Some(join(s)?), Some(join(a)?)),
            _ => (None, None),
        };
        let mut init = InitChannels::default();
        for ((kind, _), fd) in got {
            let chan =
                transport::Channel::from_stream(UnixStream::from(fd), config.channel_config())?;
            init.push(kind, chan);
        }
        core.pause();
        Ok(Opened {
            core,
            token: a.token,
            arenas,
            init,
            server_metadata: a.server_metadata,
            config,
        })
    }
}

/// The server's answer to a log-in asking for `n_cli` init channels with `config`: accepted
/// (what comes with it), or why not.
fn read_answer(rsp: &MsgIn<Master>, n_cli: u32, config: &SessionConfig) -> Result<Accepted, Error> {
    {
        let root = rsp
            .root()
            .map_err(|_| Error::Protocol("unreadable log-in response"))?;
        let Ok(master::LogInRsp(Ok(r))) = root.which() else {
            return Err(Error::Protocol("the answer to logIn is not logInRsp"));
        };
        let a = match r.which() {
            Ok(log_in_rsp::Rejected(j)) => {
                let reason = Rejection::from_code(j.get_reason())
                    .ok_or(Error::Protocol("unknown rejection code"))?;
                let detail = j
                    .get_detail()
                    .ok()
                    .and_then(|t| t.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                log::warn!(
                    target: "flowipc::session",
                    "log-in refused by the server ({reason:?}): {detail}"
                );
                return Err(Error::LogInRejected { reason, detail });
            }
            Ok(log_in_rsp::Accepted(a)) => a,
            Err(_) => return Err(Error::Protocol("unknown log-in response")),
        };
        let token = a
            .get_token()
            .ok()
            .and_then(|t| <[u8; 16]>::try_from(t).ok())
            .map(u128::from_le_bytes)
            .ok_or(Error::Protocol("session token is not 16 bytes"))?;
        let (n_srv, with_arenas) = (a.get_init_by_server(), a.get_arenas());
        let server_metadata = Metadata::from_wire(
            a.get_metadata()
                .map_err(|_| Error::Protocol("unreadable server metadata"))?,
        )?;
        if a.get_init_by_client() != n_cli
            || n_srv > super::MAX_INIT_CHANNELS
            || with_arenas != (config.shm() == ShmKind::Classic)
        {
            return Err(Error::Protocol(
                "log-in response does not match the request",
            ));
        }
        Ok(Accepted {
            token,
            n_srv,
            with_arenas,
            server_metadata,
            got: BTreeMap::new(),
        })
    }
}
