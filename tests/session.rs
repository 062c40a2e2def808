//! Sessions: the page's whole life cycle across processes, log-in safety, server instances,
//! keep-alive, channel opening, arenas. Every test has its own run dir (removed at the end, and
//! checked empty where the test owns the server).
//!
//! The suite is in `suites/session.rs`; this crate runs it over Unix-socket channels, and
//! `session_shm_queue.rs` runs the same file over shared-memory queues.

mod common;
include!("suites/session.rs");
