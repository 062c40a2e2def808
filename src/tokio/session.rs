//! Sessions with `async` methods: [`ClientSession`], [`SessionServer`], [`ServerSession`].

use std::ops::Deref;

use super::driver::{self, Driven};
use crate::session::{
    self, ClientApp, ClientApps, ConnectOptions, Error, EventLoop, Metadata, OpenOptions,
    ServerApp, Session, SessionConfig, SessionServerBuilder,
};
use crate::transport;

/// One session, client side, driven by tokio: [`connect`](ClientSession::connect), then it
/// dereferences to the open [`Session`] (arenas, structured channels, lends) and opens
/// channels with [`open_channel`](ClientSession::open_channel)`.await`.
///
/// ```no_run
/// # async fn f(cli: flowipc::session::ClientApp, srv: flowipc::session::ServerApp)
/// #     -> Result<(), flowipc::session::Error> {
/// let mut session = flowipc::tokio::ClientSession::new(&cli, &srv, |e| eprintln!("over: {e}"));
/// session.connect().await?; // `Error::ServerAbsent` at once if no server runs: retry later
/// let chan = session.open_channel(None).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ClientSession {
    inner: session::ClientSession,
    /// Set once connected.
    driven: Option<Driven>,
}

impl ClientSession {
    /// See [`session::ClientSession::new`].
    pub fn new(
        own: &ClientApp,
        server: &ServerApp,
        on_error: impl FnOnce(Error) + Send + 'static,
    ) -> ClientSession {
        ClientSession::from_blocking(session::ClientSession::new(own, server, on_error))
    }

    /// See [`session::ClientSession::with_passive_open`] (the handler runs in the session's
    /// task).
    pub fn with_passive_open(
        own: &ClientApp,
        server: &ServerApp,
        on_error: impl FnOnce(Error) + Send + 'static,
        on_passive_open: impl FnMut(transport::Channel, Option<Metadata>) + Send + 'static,
    ) -> ClientSession {
        ClientSession::from_blocking(session::ClientSession::with_passive_open(
            own,
            server,
            on_error,
            on_passive_open,
        ))
    }

    fn from_blocking(inner: session::ClientSession) -> ClientSession {
        let config = Session::config(&inner).clone();
        ClientSession {
            inner: inner.config(config.with_event_loop(EventLoop::SyncIo)),
            driven: None,
        }
    }

    /// Sets the configuration (see [`SessionConfig`]; its event loop is always sync_io here).
    pub fn config(self, config: SessionConfig) -> Self {
        ClientSession {
            inner: self.inner.config(config.with_event_loop(EventLoop::SyncIo)),
            driven: None,
        }
    }

    /// Connects and logs in (see [`session::ClientSession::sync_connect`]).
    pub async fn connect(&mut self) -> Result<(), Error> {
        self.connect_with(ConnectOptions::new()).await
    }

    /// [`connect`](ClientSession::connect) with init channels and metadata (see
    /// [`session::ClientSession::sync_connect_with`]). Cancel-safe as the [module
    /// docs](super) say.
    pub async fn connect_with(&mut self, opts: ConnectOptions) -> Result<(), Error> {
        self.inner.start_connect(opts)?;
        // Abandons the log-in if this future is dropped before it ends.
        struct Abandon<'a>(&'a mut session::ClientSession);
        impl Drop for Abandon<'_> {
            fn drop(&mut self) {
                self.0.cancel_connect();
            }
        }
        let guard = Abandon(&mut self.inner);
        loop {
            if guard.0.step_connect()? {
                break;
            }
            let wait = {
                let i = guard.0.connecting().ok_or(Error::NotStarted)?;
                let fd = i.read_fd().ok_or(Error::Hosed)?;
                driver::ready(fd, i.write_fd().is_some(), i.deadline())
            };
            wait.await.map_err(Error::Io)?;
        }
        drop(guard);
        let reactor = self.inner.reactor().ok_or(Error::NotStarted)?.clone();
        let driven = Driven::new(reactor);
        driven.ensure().map_err(Error::Io)?;
        self.driven = Some(driven);
        Ok(())
    }

    /// Opens a channel (see [`Session::open_channel`]), waiting without blocking.
    pub async fn open_channel(
        &self,
        metadata: Option<&Metadata>,
    ) -> Result<transport::Channel, Error> {
        self.open_channel_with(&with_metadata(metadata)).await
    }

    /// [`open_channel`](ClientSession::open_channel) with options.
    pub async fn open_channel_with(&self, opts: &OpenOptions) -> Result<transport::Channel, Error> {
        let driven = self.driven.as_ref().ok_or(Error::NotStarted)?;
        open_channel(driven, &self.inner, opts).await
    }

    /// The blocking API's session (init channels, server metadata).
    pub fn blocking(&mut self) -> &mut session::ClientSession {
        &mut self.inner
    }
}

impl Deref for ClientSession {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.inner
    }
}

/// Options of an opening with `metadata` (the rest as the session says).
fn with_metadata(metadata: Option<&Metadata>) -> OpenOptions {
    match metadata {
        Some(m) => OpenOptions::new().metadata(m.clone()),
        None => OpenOptions::new(),
    }
}

/// The one implementation of opening a channel asynchronously (in a session `driven` drives:
/// its task runs in this runtime first).
async fn open_channel(
    driven: &Driven,
    s: &Session,
    opts: &OpenOptions,
) -> Result<transport::Channel, Error> {
    driven.ensure().map_err(Error::Io)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let id = s.start_open(opts, move |r| {
        let _ = tx.send(r);
    })?;
    // Abandons the opening if this future is dropped (or times out) first.
    struct Abandon<'a>(&'a Session, Option<crate::struc::ReqId>);
    impl Drop for Abandon<'_> {
        fn drop(&mut self) {
            if let Some(id) = self.1.take() {
                self.0.abandon_open(id);
            }
        }
    }
    let mut guard = Abandon(s, Some(id));
    let r = tokio::time::timeout(s.config().open_timeout(), rx).await;
    match r {
        Ok(Ok(r)) => {
            guard.1 = None;
            r
        }
        // Dropped uncalled: the session ended.
        Ok(Err(_)) => Err(Error::Hosed),
        Err(_) => Err(Error::OpenTimeout),
    }
}

/// The server, driven by tokio: [`accept`](SessionServer::accept)`.await` gives each session.
#[derive(Debug)]
pub struct SessionServer {
    inner: session::SessionServer,
    driven: Driven,
}

impl SessionServer {
    /// See [`session::SessionServer::new`].
    pub fn new(app: &ServerApp, clients: &ClientApps) -> Result<SessionServer, Error> {
        SessionServer::build(session::SessionServer::builder(app, clients))
    }

    /// A server with the advanced options of `builder` (its event loop is always sync_io
    /// here).
    pub fn build(builder: SessionServerBuilder) -> Result<SessionServer, Error> {
        let inner = builder.sync_io().build()?;
        let driven = Driven::new(inner.reactor().clone());
        driven.ensure().map_err(Error::Io)?;
        Ok(SessionServer { inner, driven })
    }

    /// The next accepted session (or failed log-in). Cancel-safe.
    pub async fn accept(&self) -> Result<ServerSession, Error> {
        self.driven.ensure().map_err(Error::Io)?;
        let s = std::future::poll_fn(|cx| self.inner.poll_accept(cx)).await?;
        ServerSession::new(s)
    }

    /// The blocking API's server (paths, app arenas).
    pub fn blocking(&self) -> &session::SessionServer {
        &self.inner
    }
}

/// One session, server side, driven by tokio. Dereferences to the blocking API's
/// [`ServerSession`](session::ServerSession) (`init_handlers`, init channels, metadata).
#[derive(Debug)]
pub struct ServerSession {
    inner: session::ServerSession,
    driven: Driven,
}

impl ServerSession {
    fn new(inner: session::ServerSession) -> Result<ServerSession, Error> {
        let driven = Driven::new(inner.reactor().ok_or(Error::NotStarted)?.clone());
        driven.ensure().map_err(Error::Io)?;
        Ok(ServerSession { inner, driven })
    }

    /// Opens a channel (see [`Session::open_channel`]), waiting without blocking.
    pub async fn open_channel(
        &self,
        metadata: Option<&Metadata>,
    ) -> Result<transport::Channel, Error> {
        self.open_channel_with(&with_metadata(metadata)).await
    }

    /// [`open_channel`](ServerSession::open_channel) with options.
    pub async fn open_channel_with(&self, opts: &OpenOptions) -> Result<transport::Channel, Error> {
        open_channel(&self.driven, &self.inner, opts).await
    }
}

impl Deref for ServerSession {
    type Target = session::ServerSession;
    fn deref(&self) -> &session::ServerSession {
        &self.inner
    }
}

impl std::ops::DerefMut for ServerSession {
    fn deref_mut(&mut self) -> &mut session::ServerSession {
        &mut self.inner
    }
}
