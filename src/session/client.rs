//! The client side: [`ClientSession`].

use std::collections::BTreeMap;
use std::ops::Deref;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::core::{Master, OnError, PassiveOpen};
use super::lends::Lends;
use super::proto::{self, PROTOCOL_VERSION};
use super::{
    ClientApp, Error, InitChannels, Metadata, Rejection, ServerApp, Session, SessionConfig, ShmKind,
};
use crate::msg::Backing;
use crate::schemas::session_capnp::{log_in_rsp, master};
use crate::shm::Arena;
use crate::struc::{self, MsgType};
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
        self.connect(opts).map_err(|e| match e {
            // The server went away before the session existed (it was stopping, or closed a
            // connection past its limit of pending log-ins): as good as absent; retry.
            Error::PeerGone => Error::ServerAbsent(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "the server closed the connection during log-in",
            )),
            e => e,
        })
    }

    fn connect(&mut self, opts: ConnectOptions) -> Result<(), Error> {
        self.own.validate()?;
        self.server.validate()?;
        let config = self.session.config().clone();
        let stream = self.reach_server()?;
        let chan = transport::Channel::from_stream(stream, config.master_config())?;
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
        let rsp = core
            .sync_request(&mut req, None, Some(config.log_in_timeout()))
            .map_err(|e| match e {
                struc::Error::Timeout => Error::LogInTimeout,
                // (Only `process_ready` and its kin report to the captured slot, and none of
                // them has run yet: the call's own error is the one.)
                e => e.into(),
            })?;
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
        let (n_cli, n_srv, with_arenas) = (
            a.get_init_by_client(),
            a.get_init_by_server(),
            a.get_arenas(),
        );
        let server_metadata = Metadata::from_wire(
            a.get_metadata()
                .map_err(|_| Error::Protocol("unreadable server metadata"))?,
        )?;
        if n_cli != opts.init_channels
            || n_srv > super::MAX_INIT_CHANNELS
            || with_arenas != (config.shm() == ShmKind::Classic)
        {
            return Err(Error::Protocol(
                "log-in response does not match the request",
            ));
        }
        drop(rsp);
        // The resources came before the response: they wait in the channel's cache.
        let resource_type = MsgType::of::<Master>("resource")?;
        let mut got: BTreeMap<(u8, u32), OwnedFd> = BTreeMap::new();
        // (A channel opening may follow the response at once: that one waits for the session.)
        let others = proto::types(&["logIn", "logInRsp"])?;
        let expected = n_cli as usize + n_srv as usize + if with_arenas { 2 } else { 0 };
        while got.len() < expected {
            let mut m = proto::wait_for(&mut core, resource_type, &others, deadline)?;
            let fd = m
                .take_fd()
                .ok_or(Error::Protocol("resource without its fd"))?;
            let key = match m.root().and_then(|r| Ok(r.which()?)) {
                Ok(master::Resource(Ok(r))) => (r.get_kind(), r.get_index()),
                _ => return Err(Error::Protocol("unreadable resource")),
            };
            let in_range = match key.0 {
                proto::RES_SESSION_ARENA | proto::RES_APP_ARENA => with_arenas && key.1 == 0,
                proto::RES_INIT_BY_CLIENT => key.1 < n_cli,
                proto::RES_INIT_BY_SERVER => key.1 < n_srv,
                _ => false,
            };
            if !in_range || got.insert(key, fd).is_some() {
                return Err(Error::Protocol("unexpected or repeated resource"));
            }
        }
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
