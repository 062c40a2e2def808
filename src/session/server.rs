//! The server side: [`SessionServer`] accepts clients, [`ServerSession`] is one session.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::ops::Deref;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::app::MAX_SOCKET_PATH;
use super::core::{OnError, PassiveOpen};
use super::login::LogIn;
use super::{
    ClientApp, ClientApps, Error, InitChannels, Metadata, ServerApp, Session, SessionConfig,
};
use crate::poll::Interest;
use crate::reactor::{Notifier, Reactor, Registration, Source, Wait};
use crate::shm::Arena;
use crate::sync::lock;
use crate::sys;
use crate::transport;

/// Decides how many init channels the server opens for a client: given the client app, how many
/// the client requested, and the client's metadata.
pub type InitChannelsFn = Box<dyn Fn(&ClientApp, u32, Option<&Metadata>) -> u32 + Send + Sync>;
/// Makes the server's log-in metadata for a client (same arguments).
pub type MetadataFn =
    Box<dyn Fn(&ClientApp, u32, Option<&Metadata>) -> Option<Metadata> + Send + Sync>;

/// Most init channels one log-in may make (each side's count).
pub const MAX_INIT_CHANNELS: u32 = 64;

/// Most log-ins in progress plus accepted sessions nobody has taken yet. Past it, a new
/// connection makes room by dropping the oldest log-in still waiting for its request (reported
/// to the accept calls as [`Error::LogInTimeout`], as it would have been at its timeout), so
/// that silent connections cannot keep a client that logs in at once out; if every log-in has
/// sent its request, the new connection is closed at once (the client's `sync_connect` fails;
/// it retries later). A log-in waiting costs no thread: a connection, a few fds and a small
/// state on the library thread.
pub const MAX_PENDING_LOG_INS: usize = 1024;

pub(super) type Accepted = Result<ServerSession, Error>;
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

impl Queue {
    /// What counts against [`MAX_PENDING_LOG_INS`]: log-ins in progress and sessions nobody
    /// took (failed log-ins' errors hold nothing).
    fn pending(&self) -> usize {
        self.logging_in + self.ready.iter().filter(|r| r.is_ok()).count()
    }
}

/// What the server's parts share: the acceptor, the log-ins and the dispatcher (sources on the
/// library thread) and the `SessionServer`'s own calls.
pub(super) struct Shared {
    pub(super) app: ServerApp,
    pub(super) clients: ClientApps,
    pub(super) config: SessionConfig,
    pub(super) init_channels: Option<InitChannelsFn>,
    pub(super) metadata: Option<MetadataFn>,
    pub(super) app_arenas: Mutex<HashMap<String, Arena>>,
    queue: Mutex<Queue>,
    /// Signalled when `queue` changes (a result, a handler, stop), for `accept`.
    changed: Condvar,
    pub(super) stop: AtomicBool,
    /// The log-ins in progress, by id (so oldest first): their places on the library thread.
    pub(super) logins: Mutex<BTreeMap<u64, (Registration, Arc<LogIn>)>>,
    next_log_in: AtomicU64,
    /// Runs the `async_accept` handlers (set once the server is started).
    dispatcher: OnceLock<Notifier>,
    /// What drives the server: the library thread, or (sync_io) its owner.
    pub(super) reactor: Arc<Reactor>,
    /// Tasks waiting for `queue` to change (the tokio face's `accept`).
    wakers: Mutex<Vec<std::task::Waker>>,
}

impl Shared {
    /// `queue` changed: `accept` calls and the dispatcher look again.
    fn changed(&self) {
        self.changed.notify_all();
        for w in std::mem::take(&mut *lock(&self.wakers)) {
            w.wake();
        }
        if let Some(d) = self.dispatcher.get() {
            d.notify();
        }
    }

    /// A log-in ended with `result` (dropped if the server is stopping).
    pub(super) fn log_in_done(&self, result: Accepted) {
        let mut q = lock(&self.queue);
        // (Saturating: a server dropped from a handler during a nested round resets the count
        // under a log-in still finishing up the stack.)
        q.logging_in = q.logging_in.saturating_sub(1);
        if !self.stop.load(Ordering::Acquire) {
            q.ready.push_back(result);
        }
        drop(q);
        self.changed();
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

    /// The server runs on its own loop (for the tokio face).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn sync_io(mut self) -> Self {
        self.config = self.config.with_event_loop(super::EventLoop::SyncIo);
        self
    }

    /// Starts serving: takes the PID file's lock ([`Error::AlreadyRunning`] if another instance
    /// holds it; a dead instance's files are taken over), listens on the socket, and accepts
    /// clients on the library thread (or, with [`EventLoop::SyncIo`](super::EventLoop::SyncIo),
    /// in its owner's loop).
    pub fn build(self) -> Result<SessionServer, Error> {
        SessionServer::start(self)
    }
}

/// The session server of one [`ServerApp`]: at most one live instance per server app (the
/// PID file in the run dir is `flock`ed). Clients connect to its Unix socket in the run dir;
/// each accepted log-in becomes a [`ServerSession`]. Many sessions may be open at once.
///
/// Log-ins proceed as clients arrive, on the library thread (the process's one, which also
/// runs the sessions and async channels; the server's `init_channels` and `metadata`
/// callbacks run there too, so should not block); an accept call
/// ([`async_accept`](SessionServer::async_accept), [`accept`](SessionServer::accept)) takes the
/// next result in order: a session, or the error of a log-in that failed (a rejected client
/// gets [`Error::LogInRejected`] on both sides; the server goes on serving).
///
/// Dropping it stops accepting, completes pending accept calls with [`Error::Aborted`], and
/// removes its socket and PID file. Sessions already accepted live on, but the app-scope arenas
/// are released when their last session goes.
pub struct SessionServer {
    shared: Arc<Shared>,
    acceptor: Option<Registration>,
    dispatcher: Option<Registration>,
    /// Dropped last (after the sources are off the library thread).
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
        let listen = || -> Result<UnixListener, Error> {
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
            Ok(listener)
        };
        let listener = listen()?;
        let reactor = b.config.reactor().map_err(Error::Io)?;
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
            logins: Mutex::new(BTreeMap::new()),
            next_log_in: AtomicU64::new(0),
            dispatcher: OnceLock::new(),
            reactor: reactor.clone(),
            wakers: Mutex::default(),
        });
        let dispatcher = reactor.register(Arc::new(Dispatcher(shared.clone())));
        let _ = shared.dispatcher.set(dispatcher.notifier());
        let acceptor = reactor.register(Arc::new(Acceptor {
            shared: shared.clone(),
            listener,
        }));
        Ok(SessionServer {
            shared,
            acceptor: Some(acceptor),
            dispatcher: Some(dispatcher),
            files,
        })
    }

    /// Calls `handler` (on the library thread, never inside this call) with the next accepted
    /// session, or the error of the next failed log-in. Handlers are served in call order,
    /// results in log-in order; handlers come before [`accept`](Self::accept) calls. A handler
    /// may call the server (even drop it, or [`accept`](Self::accept): the library thread
    /// serves the log-ins meanwhile), but other handlers wait while it runs.
    pub fn async_accept(
        &self,
        handler: impl FnOnce(Result<ServerSession, Error>) + Send + 'static,
    ) {
        lock(&self.shared.queue)
            .waiters
            .push_back(Box::new(handler));
        self.shared.changed();
    }

    /// Waits (up to `timeout`; `None`: no limit) for the next accepted session or failed
    /// log-in that no [`async_accept`](Self::async_accept) handler is waiting for.
    /// [`Error::AcceptTimeout`] if none came (a later one is kept for the next call). Called
    /// from a handler (on the library thread), it takes the next result even if other handlers
    /// wait, and the library thread serves the log-ins meanwhile.
    pub fn accept(&self, timeout: Option<Duration>) -> Result<ServerSession, Error> {
        let deadline = timeout.map(|t| Instant::now() + t);
        if self.shared.reactor.must_drive() {
            // From a handler (the library thread), or a threadless server: this thread serves
            // the log-ins while it waits.
            let mut got = None;
            // (The next result is taken even if other handlers wait: they are served by the
            // dispatcher, whose turn may be the one up the stack, running this handler.)
            self.shared.reactor.nested_until(
                || {
                    got = lock(&self.shared.queue).ready.pop_front().map(hand_over);
                    got.is_some() || self.shared.stop.load(Ordering::Acquire)
                },
                deadline,
            );
            return match got {
                Some(r) => r,
                None if self.shared.stop.load(Ordering::Acquire) => Err(Error::Aborted),
                None => Err(Error::AcceptTimeout),
            };
        }
        let mut q = lock(&self.shared.queue);
        loop {
            if q.waiters.is_empty() {
                if let Some(r) = q.ready.pop_front() {
                    drop(q);
                    return hand_over(r);
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

    /// What drives the server.
    pub(crate) fn reactor(&self) -> &Arc<Reactor> {
        &self.shared.reactor
    }

    /// The next result no `async_accept` handler waits for, without waiting; for the tokio
    /// face: `cx` is woken when there may be one (or the server stops).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn poll_accept(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<ServerSession, Error>> {
        let mut q = lock(&self.shared.queue);
        if q.waiters.is_empty() {
            if let Some(r) = q.ready.pop_front() {
                drop(q);
                return std::task::Poll::Ready(hand_over(r));
            }
        }
        if self.shared.stop.load(Ordering::Acquire) {
            return std::task::Poll::Ready(Err(Error::Aborted));
        }
        // (Under the queue's lock: a change after this look wakes the task. One entry per
        // task: a pending accept polled again, or a new one of the same task, is not added
        // twice.)
        let mut wakers = lock(&self.shared.wakers);
        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        std::task::Poll::Pending
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
        self.shared.changed.notify_all();
        // Off the library thread: once these drops return, none of the server's sources runs
        // (unless dropped from one of its handlers, on that thread: the running one ends by
        // itself). The log-ins in progress go with their channels.
        drop(self.acceptor.take());
        drop(self.dispatcher.take());
        let logins = std::mem::take(&mut *lock(&self.shared.logins));
        drop(logins);
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

/// The dispatcher: hands results to `async_accept` handlers, in order, on the library thread,
/// outside the queue's lock.
struct Dispatcher(Arc<Shared>);

impl Source for Dispatcher {
    fn on_ready(&self) -> Wait {
        let shared = &self.0;
        loop {
            if shared.stop.load(Ordering::Acquire) {
                return Wait::idle();
            }
            let mut q = lock(&shared.queue);
            if q.waiters.is_empty() || q.ready.is_empty() {
                return Wait::idle();
            }
            if let (Some(w), Some(r)) = (q.waiters.pop_front(), q.ready.pop_front()) {
                drop(q);
                w(hand_over(r));
            }
        }
    }
}

/// The acceptor: accepts connections and starts a log-in for each (up to
/// [`MAX_PENDING_LOG_INS`] log-ins and untaken sessions; past it, see there). It never runs
/// user code.
struct Acceptor {
    shared: Arc<Shared>,
    listener: UnixListener,
}

impl Acceptor {
    /// Drops the oldest log-in still waiting for its request; false if there is none.
    fn make_room(&self) -> bool {
        let waiting: Vec<Arc<LogIn>> = lock(&self.shared.logins)
            .values()
            .map(|(_, l)| l.clone())
            .collect();
        // (Outside the lock: a log-in's end takes it to give up its place.)
        waiting.iter().any(|l| l.evict())
    }
}

impl Source for Acceptor {
    fn on_ready(&self) -> Wait {
        let shared = &self.shared;
        let listening = Wait::from(Interest::new(Some(self.listener.as_fd()), None, None));
        loop {
            if shared.stop.load(Ordering::Acquire) {
                return Wait::idle();
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return listening,
                Err(_) => {
                    // Out of fds, say: do not spin on a listener that stays readable.
                    return Wait {
                        deadline: Some(Instant::now() + Duration::from_millis(100)),
                        ..Wait::idle()
                    };
                }
            };
            if lock(&shared.queue).pending() >= MAX_PENDING_LOG_INS && !self.make_room() {
                continue; // `stream` dropped: closed
            }
            lock(&shared.queue).logging_in += 1;
            let id = shared.next_log_in.fetch_add(1, Ordering::Relaxed);
            match LogIn::new(shared.clone(), id, stream) {
                Ok(log_in) => {
                    let reactor = &shared.reactor;
                    // Registered under the lock: a log-in done in its first turn removes
                    // itself only after it is there.
                    let log_in = Arc::new(log_in);
                    let mut logins = lock(&shared.logins);
                    let reg = reactor.register(log_in.clone());
                    logins.insert(id, (reg, log_in));
                }
                Err(e) => shared.log_in_done(Err(e)),
            }
        }
    }
}

/// One session, server side: what [`SessionServer`] accepted. Dereferences to [`Session`],
/// usable once [`init_handlers`](ServerSession::init_handlers) is called (before it, the
/// session's keep-alive runs and the client's channel openings wait).
pub struct ServerSession {
    /// Until handed over (sync_io): the server drives the session (see `Reactor::carry`).
    /// Declared first: dropped before the session.
    carried: Option<Registration>,
    session: Session,
    client_app: ClientApp,
    init: InitChannels,
    client_metadata: Option<Metadata>,
}

impl ServerSession {
    pub(super) fn new(
        session: Session,
        client_app: ClientApp,
        init: InitChannels,
        client_metadata: Option<Metadata>,
        carried: Option<Registration>,
    ) -> Self {
        ServerSession {
            carried,
            session,
            client_app,
            init,
            client_metadata,
        }
    }
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
    /// the client opens, with its metadata (on the library thread).
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

impl ServerSession {
    pub(super) fn session(&self) -> &Session {
        &self.session
    }

    /// Handed over to the user: its owner drives it from now on.
    fn taken(mut self) -> ServerSession {
        self.carried = None;
        self
    }
}

/// A result handed over (see [`ServerSession::taken`]).
fn hand_over(r: Accepted) -> Accepted {
    r.map(ServerSession::taken)
}

impl Deref for ServerSession {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.session
    }
}
