//! flowipc: zero-copy messaging between processes on one Linux machine.
//!
//! The Rust answer to Flow-IPC: Cap'n Proto messages whose segments live in a shared-memory arena
//! that sender and receiver both map, so sending a 1 GiB message costs what a 1 KiB one does.
//!
//! Layers, bottom up (each knows nothing of the ones above):
//! * [`shm`]: memfd pools, the lock-free cross-process allocator, ref-counted handles.
//! * [`transport`]: framed Unix-socket channels with fd passing, a never-blocking send queue,
//!   graceful end and keep-alive (sync_io [`transport::Channel`], async-I/O
//!   [`transport::AsyncChannel`]).
//! * [`msg`]: zero-copy Cap'n Proto messages (segments in an arena) over a transport channel.
//! * [`struc`]: the structured channel: requests, responses, expectations, caching.
//! * [`session`]: sessions between applications: log-in safety, channel opening, session- and
//!   app-scope arenas.
//!
//! Beside the layers:
//! * [`poll`]: the one pollable contract of every sync_io core ([`poll::Pollable`]: an
//!   interest, fds and a deadline, and `on_ready`), for a user's own poll loop.
//! * The library thread: one per process, started with the first async face, it drives every
//!   async channel, session and session server of the process through that same contract. No
//!   face owns a thread of its own; handlers run there and should not block long (a blocking
//!   call from a handler, like a `sync_request` or `open_channel`, runs the thread's other work
//!   while it waits).
//!
//! `unsafe` code lives only in [`shm`] and in the crate-private syscall module.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, missing_debug_implementations)]
#![deny(clippy::undocumented_unsafe_blocks)]

/// The Cap'n Proto runtime flowipc is built on, re-exported, so that its types can be named
/// as `flowipc::capnp::...` at the version flowipc uses. Code generated from a user's schema
/// names the crate as `::capnp`, so a crate with its own schemas also needs `capnp` as a
/// direct dependency, of the same version (`cargo tree -i capnp` shows one).
pub use capnp;

#[cfg(not(flowipc_loom))]
mod hosing;
#[cfg(not(flowipc_loom))]
pub mod msg;
#[cfg(not(flowipc_loom))]
pub mod poll;
#[cfg(not(flowipc_loom))]
mod reactor;
#[cfg(not(flowipc_loom))]
pub mod schemas;
#[cfg(not(flowipc_loom))]
pub mod session;
pub mod shm;
#[cfg(not(flowipc_loom))]
pub mod struc;
mod sync;
#[cfg(not(flowipc_loom))]
mod sys;
#[cfg(all(feature = "tokio", not(flowipc_loom)))]
pub mod tokio;
#[cfg(not(flowipc_loom))]
pub mod transport;

/// The README's examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
