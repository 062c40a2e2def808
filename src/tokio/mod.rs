//! The tokio face (cargo feature `tokio`): sessions and structured channels with `async`
//! methods, driven by tokio itself. Each object here is the sync_io core of the blocking API
//! ([`EventLoop::SyncIo`](crate::session::EventLoop::SyncIo)) plus one task that waits on the
//! core's one fd with [`AsyncFd`](::tokio::io::unix::AsyncFd) and its deadline with a tokio
//! timer: the library starts no thread, and nothing busy-waits. Handlers (error, passive open,
//! `expect_msgs`) run in that task.
//!
//! Create and use them inside a tokio runtime (current-thread or multi-thread: the futures are
//! `Send`). Sending never blocks and stays a plain call; waiting for something is `async`.
//!
//! Cancel safety, per method:
//! * [`ClientSession::connect`]: dropping the future abandons the log-in (the server sees the
//!   connection close); `connect` may be called again.
//! * [`SessionServer::accept`]: cancel-safe: a session that logs in meanwhile waits for the
//!   next `accept`.
//! * `open_channel` (both sides): dropping the future abandons the opening; a late answer is
//!   dropped, and the channel with it (the peer's end then reads a close).
//! * [`Channel::request`]: dropping the future leaves the channel usable; the late response
//!   is dropped quietly, as a timed-out `sync_request`'s is.
//! * [`Messages`] (a [`Stream`](futures_core::Stream) of one message type): cancel-safe;
//!   messages wait in it until read.
//! * [`Channel::end_sending`]: dropping the future does not undo the end (it is queued at the
//!   call); the bytes still go out while the channel lives.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use flowipc::msg::Backing;
//! use flowipc::schemas::test_msgs_capnp::cool_msg;
//! use flowipc::struc::{self, MsgType};
//! use flowipc::transport::{self, ChannelConfig};
//!
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! rt.block_on(async {
//!     let (a, b) = transport::Channel::pair(ChannelConfig::new())?;
//!     let sum_request = MsgType::of::<cool_msg::Owned>("sumRequest")?;
//!     // The server answers each sumRequest from its handler.
//!     let server = flowipc::tokio::Channel::new(struc::Channel::<cool_msg::Owned>::new(b, Backing::Heap)?)?;
//!     server.expect_msgs(sum_request, |chan, req| {
//!         let mut rsp = chan.create_msg();
//!         rsp.init_root().init_sum_response().set_sum(42);
//!         let _ = chan.send(&mut rsp, Some(&req));
//!     })?;
//!     server.start(|e| eprintln!("server: {e}"))?;
//!     let client = flowipc::tokio::Channel::new(struc::Channel::<cool_msg::Owned>::new(a, Backing::Heap)?)?;
//!     client.start(|e| eprintln!("client: {e}"))?;
//!     let mut req = client.create_msg();
//!     req.init_root().init_sum_request();
//!     let rsp = client.request(&mut req, None, Some(Duration::from_secs(10))).await?;
//!     assert!(matches!(rsp.root()?.which()?, cool_msg::SumResponse(Ok(s)) if s.get_sum() == 42));
//!     Ok::<(), Box<dyn std::error::Error>>(())
//! })
//! # }
//! ```

mod channel;
mod driver;
mod session;

pub use channel::{Channel, Messages};
pub use session::{ClientSession, ServerSession, SessionServer};
