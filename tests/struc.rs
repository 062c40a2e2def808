//! The structured channel: notifications, caching, requests, responses, unexpected responses,
//! hosing; in one process (socket pairs) and across processes.
//!
//! The suite is in `suites/struc.rs`; this crate runs it over Unix-socket channels, and
//! `struc_shm_queue.rs` runs the same file over shared-memory queues.

mod common;
include!("suites/struc.rs");
