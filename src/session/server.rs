//! The server side: [`SessionServer`] accepts clients, [`ServerSession`] is one session.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::ops::Deref;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::app::MAX_SOCKET_PATH;
use super::core::{Master, OnError, PassiveOpen};
use super::proto::{self, LogInReq};
use super::{
    ClientApp, ClientApps, Error, InitChannels, Metadata, Rejection, ServerApp, Session,
    SessionConfig, ShmKind,
};
use crate::msg::Backing;
use crate::shm::{Arena, ArenaConfig};
use crate::struc::{self, MsgType};
use crate::sync::lock;
use crate::sys::{self, PollFd, Waker};
use crate::transport;

/// Decides how many init channels the server opens for a client: given the client app, how many
/// the client requested, and the client's metadata.
pub type InitChannelsFn = Box<dyn Fn(&ClientApp, u32, Option<&Metadata>) -> u32 + Send + Sync>;
/// Makes the server's log-in metadata for a client (same arguments).
pub type MetadataFn =
    Box<dyn Fn(&ClientApp, u32, Option<&Metadata>) -> Option<Metadata> + Send + Sync>;

/// Most init channels one log-in may make (each side's count).
pub const MAX_INIT_CHANNELS: u32 = 64;

/// Most log-ins in progress plus accepted sessions nobody has taken yet: past it, new
/// connections are closed at once (the client's `sync_connect` fails; it retries later).
pub const MAX_PENDING_LOG_INS: usize = 64;

type Accepted = Result<ServerSession, Error>;
type Waiter = Box<dyn FnOnce(Accepted) + Send>;

#[derive(Default)]
struct Queue {
    /// `async_accept` handlers, in call order.
    waiters: VecDeque<Waiter>,
    /// Results nobody took yet, in log-in order (handlers get them first, then `accept`).
    ready: VecDeque<Accepted>,
    /// Log-ins in progress.
    logging_in: usize,
}

struct Shared {
    app: ServerApp,
    clients: ClientApps,
    config: SessionConfig,
    init_channels: Option<InitChannelsFn>,
    metadata: Option<MetadataFn>,
    app_arenas: Mutex<HashMap<String, Arena>>,
    queue: Mutex<Queue>,
    /// Signalled when `queue` changes (a result, a handler, stop).
    changed: Condvar,
    stop: AtomicBool,
    /// Wakes the acceptor thread (to stop).
    waker: Waker,
    logins: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn wake(&self) {
        self.waker.wake();
    }
}

/// Builds a [`SessionServer`] with the advanced options: configuration, init channels decided
/// per client, metadata for each client.
pub struct SessionServerBuilder {
    app: ServerApp,
    clients: ClientApps,
    config: SessionConfig,
    init_channels: Option<InitChannelsFn>,
    metadata: Option<MetadataFn>,
}

impl std::fmt::Debug for SessionServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionServerBuilder")
            .field("app", &self.app.name)
            .field("config", &self.config)
            .finish()
    }
}

impl SessionServerBuilder {
    /// The session configuration (see [`SessionConfig`]; some of it must match the clients').
    pub fn config(mut self, config: SessionConfig) -> Self {
        self.config = config;
        self
    }

    /// How many init channels the server opens at each log-in, besides those the client asks
    /// for: `f(client app, channels the client requested, client's metadata)`, at most
    /// [`MAX_INIT_CHANNELS`]. Default: none.
    pub fn init_channels(
        mut self,
        f: impl Fn(&ClientApp, u32, Option<&Metadata>) -> u32 + Send + Sync + 'static,
    ) -> Self {
        self.init_channels = Some(Box::new(f));
        self
    }

    /// The metadata the server sends each client at log-in: `f(client app, channels the client
    /// requested, client's metadata)`. Default: none.
    pub fn metadata(
        mut self,
        f: impl Fn(&ClientApp, u32, Option<&Metadata>) -> Option<Metadata> + Send + Sync + 'static,
    ) -> Self {
        self.metadata = Some(Box::new(f));
        self
    }

    /// Starts serving: takes the PID file's lock ([`Error::AlreadyRunning`] if another instance
    /// holds it; a dead instance's files are taken over), listens on the socket, and accepts
    /// clients on a library thread.
    pub fn build(self) -> Result<SessionServer, Error> {
        SessionServer::start(self)
    }
}

/// The session server of one [`ServerApp`]: at most one live instance per server app (the
/// PID file in the run dir is `flock`ed). Clients connect to its Unix socket in the run dir;
/// each accepted log-in becomes a [`ServerSession`]. Many sessions may be open at once.
///
/// Log-ins proceed as clients arrive, each on its own short-lived thread; an accept call
/// ([`async_accept`](SessionServer::async_accept), [`accept`](SessionServer::accept)) takes the
/// next result in order: a session, or the error of a log-in that failed (a rejected client
/// gets [`Error::LogInRejected`] on both sides; the server goes on serving).
///
/// Dropping it stops accepting, completes pending accept calls with [`Error::Aborted`], and
/// removes its socket and PID file. Sessions already accepted live on, but the app-scope arenas
/// are released when their last session goes.
pub struct SessionServer {
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    dispatcher: Option<JoinHandle<()>>,
    /// Dropped last (after the threads are joined).
    files: RunFiles,
}

/// The live instance's files: removed when dropped (on drop of the server, or on any failure to
/// start it), socket first, then the PID file, then the lock goes: a new instance can take the
/// lock only once our socket is gone.
struct RunFiles {
    socket: PathBuf,
    pid: PathBuf,
    lock: nix::fcntl::Flock<File>,
}

impl Drop for RunFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.pid);
        // (`lock` is released as the field drops, after this.)
    }
}

impl std::fmt::Debug for SessionServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionServer")
            .field("app", &self.shared.app.name)
            .field("socket", &self.files.socket)
            .finish()
    }
}

fn run_dir_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::RunDir {
        path: path.to_owned(),
        source,
    }
}

impl SessionServer {
    /// A server with the default configuration: see [`builder`](SessionServer::builder).
    pub fn new(app: &ServerApp, clients: &ClientApps) -> Result<SessionServer, Error> {
        SessionServer::builder(app, clients).build()
    }

    /// A builder for a server of `app`, which knows the client apps `clients` (the universe's
    /// master set).
    pub fn builder(app: &ServerApp, clients: &ClientApps) -> SessionServerBuilder {
        SessionServerBuilder {
            app: app.clone(),
            clients: clients.clone(),
            config: SessionConfig::new(),
            init_channels: None,
            metadata: None,
        }
    }

    fn start(b: SessionServerBuilder) -> Result<SessionServer, Error> {
        b.app.validate()?;
        for c in b.clients.values() {
            c.validate()?;
        }
        for name in &b.app.allowed_client_apps {
            if !b.clients.contains_key(name) {
                return Err(Error::UnknownApp(name.clone()));
            }
        }
        if b.app.run_dir.is_none() && b.app.permissions != super::Permissions::User {
            // The default run dir is per user (and `$XDG_RUNTIME_DIR` is 0700): other users
            // could not reach it, and might resolve another path.
            return Err(Error::RunDir {
                path: b.app.resolved_run_dir(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "group or unrestricted permissions need an explicit run dir that all the \
                     apps can reach (ServerApp::run_dir)",
                ),
            });
        }
        let dir = b.app.resolved_run_dir();
        let socket_path = b.app.socket_path();
        let pid_path = b.app.pid_file();
        if socket_path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::PathTooLong(socket_path));
        }
        make_run_dir(&dir, b.app.permissions.dir_mode(), b.app.run_dir.is_none())?;
        let lock = lock_pid_file(&pid_path, b.app.permissions.pid_file_mode())?;
        // The lock is ours: whatever socket is there is a dead instance's.
        match std::fs::remove_file(&socket_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(run_dir_err(&socket_path)(e)),
        }
        // From here on, any failure leaves nothing behind (the lock still held: no other
        // instance raced us).
        let files = RunFiles {
            socket: socket_path.clone(),
            pid: pid_path.clone(),
            lock,
        };
        let listen = || -> Result<(UnixListener, Waker), Error> {
            let listener = UnixListener::bind(&socket_path).map_err(run_dir_err(&socket_path))?;
            std::fs::set_permissions(
                &socket_path,
                std::fs::Permissions::from_mode(b.app.permissions.socket_mode()),
            )
            .map_err(run_dir_err(&socket_path))?;
            listener
                .set_nonblocking(true)
                .map_err(run_dir_err(&socket_path))?;
            // The PID goes in once the socket listens: a client that reads it can connect.
            let mut file: &File = &files.lock;
            file.set_len(0)
                .and_then(|()| file.rewind())
                .and_then(|()| writeln!(file, "{}", std::process::id()))
                .map_err(run_dir_err(&pid_path))?;
            Ok((listener, Waker::new().map_err(Error::Io)?))
        };
        let (listener, waker) = listen()?;
        let shared = Arc::new(Shared {
            app: b.app,
            clients: b.clients,
            config: b.config,
            init_channels: b.init_channels,
            metadata: b.metadata,
            app_arenas: Mutex::new(HashMap::new()),
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            waker,
            logins: Mutex::new(Vec::new()),
        });
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(Error::Io)
        };
        let s = shared.clone();
        let acceptor = spawn("flowipc-accept", Box::new(move || accept_loop(s, listener)));
        let s = shared.clone();
        let dispatcher = spawn("flowipc-dispatch", Box::new(move || dispatch_loop(&s)));
        let (acceptor, dispatcher) = match (acceptor, dispatcher) {
            (Ok(a), Ok(d)) => (a, d),
            (a, d) => {
                shared.stop.store(true, Ordering::Release);
                shared.wake();
                shared.changed.notify_all();
                for t in [a, d].into_iter().flatten() {
                    let _ = t.join();
                }
                return Err(Error::Io(std::io::Error::other(
                    "cannot start the server's threads",
                )));
            }
        };
        Ok(SessionServer {
            shared,
            acceptor: Some(acceptor),
            dispatcher: Some(dispatcher),
            files,
        })
    }

    /// Calls `handler` (on a library thread of the server's, never inside this call) with the
    /// next accepted session, or the error of the next failed log-in. Handlers are served in
    /// call order, results in log-in order; handlers come before [`accept`](Self::accept)
    /// calls. A handler may call the server (even drop it), but other handlers wait while it
    /// runs.
    pub fn async_accept(
        &self,
        handler: impl FnOnce(Result<ServerSession, Error>) + Send + 'static,
    ) {
        lock(&self.shared.queue)
            .waiters
            .push_back(Box::new(handler));
        self.shared.changed.notify_all();
    }

    /// Waits (up to `timeout`; `None`: no limit) for the next accepted session or failed
    /// log-in that no [`async_accept`](Self::async_accept) handler is waiting for.
    /// [`Error::AcceptTimeout`] if none came (a later one is kept for the next call).
    pub fn accept(&self, timeout: Option<Duration>) -> Result<ServerSession, Error> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut q = lock(&self.shared.queue);
        loop {
            if q.waiters.is_empty() {
                if let Some(r) = q.ready.pop_front() {
                    return r;
                }
            }
            if self.shared.stop.load(Ordering::Acquire) {
                return Err(Error::Aborted);
            }
            q = match deadline {
                None => self
                    .shared
                    .changed
                    .wait(q)
                    .unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::AcceptTimeout);
                    }
                    self.shared
                        .changed
                        .wait_timeout(q, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// The app-scope arena of client app `name` (made at its first log-in; `None` before, or in
    /// a vanilla server).
    pub fn app_arena(&self, name: &str) -> Option<Arena> {
        lock(&self.shared.app_arenas).get(name).cloned()
    }

    /// The socket clients connect to.
    pub fn socket_path(&self) -> &Path {
        &self.files.socket
    }

    /// The PID file.
    pub fn pid_file(&self) -> &Path {
        &self.files.pid
    }
}

impl Drop for SessionServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        self.shared.changed.notify_all();
        let me = std::thread::current().id();
        for t in [self.acceptor.take(), self.dispatcher.take()]
            .into_iter()
            .flatten()
        {
            // A handler may drop the server on the dispatcher thread: it ends by itself then.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
        let logins = std::mem::take(&mut *lock(&self.shared.logins));
        for t in logins {
            let _ = t.join();
        }
        let q = std::mem::take(&mut *lock(&self.shared.queue));
        for w in q.waiters {
            w(Err(Error::Aborted));
        }
        drop(q.ready);
        // `files` goes after this (see `RunFiles`).
    }
}

/// Creates the run dir if missing. The default one must be ours and not writable by others.
fn make_run_dir(dir: &Path, mode: u32, is_default: bool) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(run_dir_err(dir))?;
    if is_default {
        let md = std::fs::metadata(dir).map_err(run_dir_err(dir))?;
        if md.uid() != sys::effective_ids().0 || md.mode() & 0o022 != 0 {
            return Err(Error::RunDir {
                path: dir.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "the default run dir belongs to another user or others may write it",
                ),
            });
        }
    }
    Ok(())
}

/// Opens and locks the PID file: the one live instance holds the lock. A file that a previous
/// instance removed while we opened it is not the live one: try again.
fn lock_pid_file(path: &Path, mode: u32) -> Result<nix::fcntl::Flock<File>, Error> {
    for _ in 0..100 {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(mode)
            .open(path)
            .map_err(run_dir_err(path))?;
        match sys::try_flock(file).map_err(run_dir_err(path))? {
            Err(mut file) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(Error::AlreadyRunning {
                    pid: text.trim().parse().ok(),
                });
            }
            Ok(lock) => {
                let ours = lock.metadata().map_err(run_dir_err(path))?;
                match std::fs::metadata(path) {
                    Ok(there) if there.ino() == ours.ino() && there.dev() == ours.dev() => {
                        return Ok(lock);
                    }
                    _ => continue, // unlinked under us: the next open makes a new one
                }
            }
        }
    }
    Err(Error::RunDir {
        path: path.to_owned(),
        source: std::io::Error::other("the PID file keeps changing"),
    })
}

/// The dispatcher thread: hands results to `async_accept` handlers, in order, outside the lock.
fn dispatch_loop(shared: &Shared) {
    let mut q = lock(&shared.queue);
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        if !q.waiters.is_empty() && !q.ready.is_empty() {
            if let (Some(w), Some(r)) = (q.waiters.pop_front(), q.ready.pop_front()) {
                drop(q);
                w(r);
                q = lock(&shared.queue);
                continue;
            }
        }
        q = shared.changed.wait(q).unwrap_or_else(|e| e.into_inner());
    }
}

/// The acceptor thread: accepts connections and starts a log-in thread for each (up to
/// [`MAX_PENDING_LOG_INS`] log-ins and untaken sessions; past it, closes them at once). It
/// never runs user code.
fn accept_loop(shared: Arc<Shared>, listener: UnixListener) {
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let mut fds = [
            PollFd::new(listener.as_fd(), true, false),
            PollFd::new(shared.waker.as_fd(), true, false),
        ];
        let _ = sys::poll(&mut fds, Some(Duration::from_secs(1)));
        shared.waker.drain();
        loop {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // Out of fds, say: do not spin on a listener that stays readable.
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            };
            {
                let mut q = lock(&shared.queue);
                if q.logging_in + q.ready.len() >= MAX_PENDING_LOG_INS {
                    continue; // `stream` dropped: closed
                }
                q.logging_in += 1;
            }
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name("flowipc-login".into())
                .spawn(move || {
                    let mut slot = LogInSlot(s.clone(), None);
                    slot.1 = Some(log_in(&s, stream));
                });
            match t {
                Ok(t) => {
                    let mut logins = lock(&shared.logins);
                    logins.retain(|t| !t.is_finished());
                    logins.push(t);
                }
                Err(_) => lock(&shared.queue).logging_in -= 1,
            }
        }
    }
}

/// A log-in in progress: when it ends (even by a panic in a user callback), its count goes and
/// its result, if any, is queued.
struct LogInSlot(Arc<Shared>, Option<Accepted>);

impl Drop for LogInSlot {
    fn drop(&mut self) {
        let mut q = lock(&self.0.queue);
        q.logging_in -= 1;
        if let Some(r) = self.1.take() {
            if !self.0.stop.load(Ordering::Acquire) {
                q.ready.push_back(r);
            }
        }
        drop(q);
        self.0.changed.notify_all();
    }
}

/// A 128-bit random token (the kernel's randomness; the std hasher's if that fails).
fn random_token() -> u128 {
    let mut b = [0u8; 16];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u128::from_le_bytes(b);
    }
    // The arena ids' source (the std hasher's random keys).
    let half = || crate::shm::random_id() as u128;
    half() << 64 | half()
}

/// Runs one client's log-in on its connection.
fn log_in(shared: &Arc<Shared>, stream: UnixStream) -> Accepted {
    // The connecting process as the kernel saw it (a connection accepted from the listening
    // socket: its `SO_PEERCRED` is the client's own, unlike a socketpair's).
    let creds = sys::peer_credentials(stream.as_fd()).map_err(Error::Io)?;
    let cfg = &shared.config;
    let chan = transport::Channel::from_stream(stream, cfg.master_config())?;
    let mut core = struc::Channel::<Master>::new(chan, Backing::Heap)?;
    core.start(|_| {})?;
    let deadline = Instant::now() + cfg.log_in_timeout();
    let log_in_type = MsgType::of::<Master>("logIn")?;
    // Nothing but the log-in may come first (nothing else is cached, however much is sent).
    let others = proto::types(&["logInRsp", "resource", "openChannel", "openChannelRsp"])?;
    let req_msg = proto::wait_for(&mut core, log_in_type, &others, deadline, &shared.stop)?;
    let prepared = LogInReq::parse(&req_msg)
        .and_then(|req| {
            let app = check(shared, &req, creds)?;
            Ok((req, app))
        })
        .and_then(|(req, app)| {
            let p = provide(shared, &app, &req)?;
            Ok((req, app, p))
        });
    let (req, client_app, p) = match prepared {
        Ok(x) => x,
        Err((reason, detail)) => {
            // Tells the client why (the response to its log-in); our error says the same.
            let mut rsp = core.create_msg();
            {
                let mut r = rsp.init_root().init_log_in_rsp().init_rejected();
                r.set_reason(reason.code());
                r.set_detail(detail.as_str());
            }
            let _ = core.send(&mut rsp, Some(&req_msg));
            proto::finish_sending(&mut core, deadline, &shared.stop);
            return Err(Error::LogInRejected { reason, detail });
        }
    };
    // Init channels: ours kept, theirs sent (one resource message, one fd, each).
    let mut init = InitChannels::default();
    for (kind, mine) in p.ours {
        init.push(
            kind,
            transport::Channel::from_stream(mine, cfg.channel_config())?,
        );
    }
    for (kind, index, fd) in p.theirs {
        let mut m = core.create_msg_with_fd(fd);
        {
            let mut r = m.init_root().init_resource();
            r.set_kind(kind);
            r.set_index(index);
        }
        core.send(&mut m, None)?;
    }
    let token = random_token();
    let mut rsp = core.create_msg();
    {
        let mut a = rsp.init_root().init_log_in_rsp().init_accepted();
        a.set_token(&token.to_le_bytes());
        a.set_init_by_client(req.init_channels);
        a.set_init_by_server(p.n_srv);
        if let Some(m) = &p.metadata {
            a.set_metadata(m.as_bytes());
        }
        a.set_arenas(p.arenas.0.is_some());
    }
    core.send(&mut rsp, Some(&req_msg))?;
    drop(req_msg);
    core.pause();
    let session = Session::open(core, token, cfg.clone(), client_app.name.clone(), p.arenas)?;
    Ok(ServerSession {
        session,
        client_app,
        init,
        client_metadata: req.metadata,
    })
}

/// What an accepted log-in gets: the arenas, the init channels (our ends by kind; theirs by
/// kind and index, to send), and what the server decided for this client.
struct Provision {
    arenas: (Option<Arena>, Option<Arena>),
    ours: Vec<(u8, UnixStream)>,
    theirs: Vec<(u8, u32, OwnedFd)>,
    n_srv: u32,
    metadata: Option<Metadata>,
}

/// Makes what an accepted log-in gets; on failure, why (the client is refused).
fn provide(
    shared: &Shared,
    client_app: &ClientApp,
    req: &LogInReq,
) -> Result<Provision, (Rejection, String)> {
    let cfg = &shared.config;
    let refuse = |detail: String| (Rejection::Resources, detail);
    // Arenas: the session's own, and the client app's (made at its first session).
    let arenas = if cfg.shm() == ShmKind::Classic {
        let pool = ArenaConfig::new().pool_size(cfg.pool_size()).max_pools(1);
        let session = Arena::create(pool.clone());
        let app = {
            let mut m = lock(&shared.app_arenas);
            match m.get(&client_app.name) {
                Some(a) => Ok(a.clone()),
                None => Arena::create(pool).inspect(|a| {
                    m.insert(client_app.name.clone(), a.clone());
                }),
            }
        };
        match (session, app) {
            (Ok(s), Ok(a)) => (Some(s), Some(a)),
            (Err(e), _) | (_, Err(e)) => return Err(refuse(format!("no arena: {e}"))),
        }
    } else {
        (None, None)
    };
    let n_srv = shared
        .init_channels
        .as_ref()
        .map_or(0, |f| {
            f(client_app, req.init_channels, req.metadata.as_ref())
        })
        .min(MAX_INIT_CHANNELS);
    let metadata = shared
        .metadata
        .as_ref()
        .and_then(|f| f(client_app, req.init_channels, req.metadata.as_ref()));
    let mut theirs = Vec::new();
    for (s, kind) in [
        (&arenas.0, proto::RES_SESSION_ARENA),
        (&arenas.1, proto::RES_APP_ARENA),
    ] {
        if let Some(s) = s {
            match s.pool_fd(0).map(|fd| fd.try_clone_to_owned()) {
                Some(Ok(fd)) => theirs.push((kind, 0, fd)),
                _ => return Err(refuse("arena pool fd".into())),
            }
        }
    }
    let mut ours = Vec::new();
    for (kind, n) in [
        (proto::RES_INIT_BY_CLIENT, req.init_channels),
        (proto::RES_INIT_BY_SERVER, n_srv),
    ] {
        for i in 0..n {
            let (mine, other) =
                UnixStream::pair().map_err(|e| refuse(format!("socketpair: {e}")))?;
            ours.push((kind, mine));
            theirs.push((kind, i, OwnedFd::from(other)));
        }
    }
    Ok(Provision {
        arenas,
        ours,
        theirs,
        n_srv,
        metadata,
    })
}

/// The log-in checks; on failure, why (both sides are told).
fn check(
    shared: &Shared,
    req: &LogInReq,
    creds: sys::PeerCred,
) -> Result<ClientApp, (Rejection, String)> {
    if req.protocol_version != proto::PROTOCOL_VERSION {
        return Err((
            Rejection::ProtocolVersion,
            format!(
                "client speaks version {}, server {}",
                req.protocol_version,
                proto::PROTOCOL_VERSION
            ),
        ));
    }
    if req.server_app != shared.app.name {
        return Err((
            Rejection::WrongServerApp,
            format!(
                "client wants server app {:?}, this is {:?}",
                req.server_app, shared.app.name
            ),
        ));
    }
    let Some(app) = shared.clients.get(&req.client_app) else {
        return Err((
            Rejection::UnknownClientApp,
            format!("client app {:?} is not in the universe", req.client_app),
        ));
    };
    if !shared.app.allowed_client_apps.contains(&req.client_app) {
        return Err((
            Rejection::ClientAppNotAllowed,
            format!(
                "client app {:?} may not open sessions with {:?}",
                req.client_app, shared.app.name
            ),
        ));
    }
    if (creds.uid, creds.gid) != (app.uid, app.gid) {
        return Err((
            Rejection::Credentials,
            format!(
                "the connecting process runs as uid {} gid {}; app {:?} is uid {} gid {}",
                creds.uid, creds.gid, app.name, app.uid, app.gid
            ),
        ));
    }
    if (req.pid, req.uid, req.gid) != (creds.pid, creds.uid, creds.gid) {
        return Err((
            Rejection::Credentials,
            format!(
                "the client claims pid {} uid {} gid {}; the kernel says pid {} uid {} gid {}",
                req.pid, req.uid, req.gid, creds.pid, creds.uid, creds.gid
            ),
        ));
    }
    proto::check_exe(creds.pid, &app.exec_path).map_err(|d| (Rejection::ExecPath, d))?;
    let ours = &shared.config;
    let mismatch = if req.shm != ours.shm_code() {
        Some("SHM kind")
    } else if req.channel_kind != ours.channel_code() {
        Some("channel kind")
    } else if req.native_handles != ours.native_handles() {
        Some("fd passing (native handles)")
    } else {
        None
    };
    if let Some(what) = mismatch {
        return Err((
            Rejection::Config,
            format!("the client's {what} differs from the server's"),
        ));
    }
    if req.init_channels > MAX_INIT_CHANNELS {
        return Err((
            Rejection::Config,
            format!(
                "{} init channels requested; at most {MAX_INIT_CHANNELS}",
                req.init_channels
            ),
        ));
    }
    Ok(app.clone())
}

/// One session, server side: what [`SessionServer`] accepted. Dereferences to [`Session`],
/// usable once [`init_handlers`](ServerSession::init_handlers) is called (before it, the
/// session's keep-alive runs and the client's channel openings wait).
pub struct ServerSession {
    session: Session,
    client_app: ClientApp,
    init: InitChannels,
    client_metadata: Option<Metadata>,
}

impl std::fmt::Debug for ServerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSession")
            .field("client_app", &self.client_app.name)
            .field("session", &self.session)
            .finish()
    }
}

impl ServerSession {
    /// The client app on the other side.
    pub fn client_app(&self) -> &ClientApp {
        &self.client_app
    }

    /// Opens the session for use: `on_error` fires once when it is over (the client gone, or
    /// silent past the idle timeout). The client cannot open channels to this side.
    pub fn init_handlers(
        &mut self,
        on_error: impl FnOnce(Error) + Send + 'static,
    ) -> Result<(), Error> {
        self.session
            .install_handlers(Box::new(on_error) as OnError, None)
    }

    /// [`init_handlers`](ServerSession::init_handlers), and `on_passive_open` gets each channel
    /// the client opens, with its metadata (on a thread of the session's).
    pub fn init_handlers_with_passive_open(
        &mut self,
        on_error: impl FnOnce(Error) + Send + 'static,
        on_passive_open: impl FnMut(transport::Channel, Option<Metadata>) + Send + 'static,
    ) -> Result<(), Error> {
        self.session.install_handlers(
            Box::new(on_error),
            Some(Box::new(on_passive_open) as PassiveOpen),
        )
    }

    /// Takes the init channels (see [`InitChannels`]); later calls get none.
    pub fn take_init_channels(&mut self) -> InitChannels {
        std::mem::take(&mut self.init)
    }

    /// The client's log-in metadata, if it sent some.
    pub fn client_metadata(&self) -> Option<&Metadata> {
        self.client_metadata.as_ref()
    }
}

impl Deref for ServerSession {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.session
    }
}
