//! Zero-copy capnp messages over a Unix-socket channel, across real processes; and bad input.
//!
//! The suite is in `suites/msg.rs`; this crate runs it over Unix-socket channels, and
//! `msg_shm_queue.rs` runs the same file over shared-memory queues.

mod common;
include!("suites/msg.rs");
