//! Sessions: the context two applications' processes share for IPC, from which channels are
//! opened and through which shared-memory arenas are reached (Flow-IPC's `ipc::session`).
//!
//! # The universe, once
//!
//! Describe every application in one place both sides' code share: an [`App`] per
//! application (name, executable, user, group), a [`ClientApp`] for each in the client role
//! (collected in a master set, [`ClientApps`]), a [`ServerApp`] for each in the server role
//! (which clients it accepts, its run dir, its [`Permissions`]).
//!
//! # Server and client
//!
//! At most one instance of a server app runs at a time: [`SessionServer`] `flock`s the PID file
//! `<run dir>/<app>.pid` and listens on `<run dir>/<app>.sock` (the run dir defaults to
//! `$XDG_RUNTIME_DIR/flowipc`). A dead instance's files are taken over by the next one. Each
//! client log-in is checked (allow-list, the connecting process's uid/gid from `SO_PEERCRED`,
//! its executable from `/proc/<pid>/exe`, protocol version, configuration) and becomes a
//! [`ServerSession`], usable after [`ServerSession::init_handlers`].
//!
//! A client makes a [`ClientSession`] and calls [`ClientSession::sync_connect`], which fails
//! at once with [`Error::ServerAbsent`] while no server runs: retry later.
//!
//! Once open, both sides are a [`Session`]: [`open_channel`](Session::open_channel) (the
//! peer's passive-open handler gets the other end), [`structured`](Session::structured)
//! channels in the session's arena carrying its token, the session-scope and app-scope arenas,
//! [`lend_object`](Session::lend_object) / [`borrow_object`](Session::borrow_object). The
//! error handler fires once, when the peer is gone or silent past the keep-alive's idle timeout,
//! with that first real cause ([`Error::PeerGone`], [`Error::IdleTimeout`], [`Error::Protocol`]),
//! whatever the order in which the library met the events and also when the handlers are
//! installed after the cause: never the `Hosed` that calls meeting the ended session get.
//!
//! # Arenas grow
//!
//! The session-scope and app-scope arenas start with one pool
//! ([`SessionConfig::with_pool_size`]) and grow by pools, either side's allocations alike, up
//! to the arena limit ([`SessionConfig::with_arena_limit`], the server's, recorded in each
//! arena); past it an allocation fails with [`shm::Error::LimitReached`](crate::shm::Error)
//! and the session goes on. A pool one side makes reaches the other before any handle into it
//! can: a structured channel announces it ahead of the message, a lend on the session's own
//! channel ahead of the blob (the peer's [`borrow_object`](Session::borrow_object) waits for
//! it if the blob came faster, by another way), and the client announces its own growth at once.
//!
//! # When a client dies
//!
//! A client keeps, in its session arena, a ledger of what it holds of the objects of the
//! session's two arenas ([`ShmHandle`](crate::shm::ShmHandle)s it made, cloned or borrowed, and
//! its lends), and the server keeps what it lent the client and adopted of the client's lends.
//! When the session ends because the client process died (the server sees [`Error::PeerGone`]),
//! the server gives back, before its error handler runs: the references the client's handles
//! held, the client's lends nobody adopted, and the server's lends the client never adopted; and
//! it reclaims the client's thread caches. The last reference given back frees an object, so
//! the app-scope arena, which outlives sessions, returns to what it held before the client.
//!
//! * What the server borrowed of the dead client's objects is its own reference: it stays valid
//!   until the server drops it. A lend of the client's that the server had not borrowed by then
//!   is void: borrowing it fails ([`shm::Error::Stale`](crate::shm::Error::Stale)).
//! * A client that ends its session alive (drops it) closes its ledger first: what it still
//!   holds stays its own (and is not given back if the process dies later).
//! * Lend and borrow through [`lend_object`](Session::lend_object) and
//!   [`borrow_object`](Session::borrow_object): lends are counted per object, and the session
//!   tells the server's own adoptions apart. A lend made with [`ShmHandle::lend`](
//!   crate::shm::ShmHandle::lend) directly is not the session's to settle.
//! * Messages (`structured` channels) are not in the ledger: a client killed with a message of
//!   the app-scope arena in flight leaks it (session-scope messages go with the session arena).
//! * A process killed in the few instructions between an allocation or a reference-count step and
//!   its record in the ledger leaks that one block, as every block leaked before the ledger.
//!
//! # Example
//!
//! Both sides in one process here (a real split has two programs sharing the universe code;
//! see `examples/session_server.rs` and `examples/session_client.rs`):
//!
//! ```
//! use std::time::Duration;
//! use flowipc::schemas::test_msgs_capnp::cool_msg;
//! use flowipc::session::{App, ClientApp, ClientSession, ServerApp, SessionServer};
//!
//! // The universe (both apps are this process, for the example).
//! let dir = std::env::temp_dir().join(format!("fipc-doc-{}", std::process::id()));
//! # struct Gone(std::path::PathBuf);
//! # impl Drop for Gone { fn drop(&mut self) { let _ = std::fs::remove_dir_all(&self.0); } }
//! # let _gone = Gone(dir.clone());
//! let srv_app = ServerApp::new(App::current("a")?, ["b"]).run_dir(&dir);
//! let cli_app = ClientApp::new(App::current("b")?);
//! let clients = ClientApp::master_set([&cli_app]);
//!
//! let server = SessionServer::new(&srv_app, &clients)?;
//! let mut client = ClientSession::new(&cli_app, &srv_app, |e| eprintln!("client: {e}"));
//! client.sync_connect()?;
//! let mut session = server.accept(Some(Duration::from_secs(10)))?;
//! let (tx, rx) = std::sync::mpsc::channel();
//! session.init_handlers_with_passive_open(
//!     |e| eprintln!("server: {e}"),
//!     move |chan, _metadata| tx.send(chan).unwrap(),
//! )?;
//!
//! // The client opens a channel; both make it structured (zero-copy, in the session's arena;
//! // small messages are copied, which costs less).
//! let mut c = client.structured::<cool_msg::Owned>(client.open_channel(None)?)?;
//! let mut s = session.structured::<cool_msg::Owned>(rx.recv()?)?;
//! let mut msg = c.create_msg();
//! let mut hello = msg.init_root().init_hello_there();
//! hello.set_num(7);
//! hello.set_greeting("hello ".repeat(1000).as_str());
//! c.send(&mut msg, None)?;
//! # s.start(|_| {})?;
//! # let got = loop {
//! #     if let Some(m) = s.take_cached(flowipc::schemas::test_msgs_capnp::CoolMsgKind::HelloThere)? { break m; }
//! #     s.run_for(Duration::from_millis(10))?;
//! # };
//! # assert!(got.is_zero_copy());
//! drop((c, s, session, client, server));
//! # assert_eq!(std::fs::read_dir(&dir)?.count(), 0, "the server's files are gone");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod app;
mod client;
mod config;
mod core;
mod error;
pub(crate) mod lends;
mod login;
mod metadata;
mod pools;
mod proto;
mod server;
mod sync_io;

/// What a session's channels are made of: the transport's kinds (both sides must agree).
pub use crate::transport::{ChannelKind, WaitPolicy};
pub use app::{default_run_dir, App, ClientApp, ClientApps, Permissions, ServerApp};
pub use client::{ClientSession, ConnectOptions};
pub use config::{EventLoop, SessionConfig, ShmKind};
pub use core::{InitChannels, OpenOptions, Scope, Session};
pub use error::{Error, Rejection};
pub use metadata::{Metadata, MAX_METADATA};
pub use server::{
    InitChannelsFn, MetadataFn, ServerSession, SessionServer, SessionServerBuilder,
    MAX_INIT_CHANNELS, MAX_PENDING_LOG_INS,
};
