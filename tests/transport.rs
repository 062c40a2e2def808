//! The unstructured transport across real processes: fd passing, floods in both directions, a
//! peer SIGKILLed mid-stream, bad input, high-water, graceful end, keep-alive and the async-I/O
//! face.
//!
//! The suite is in `suites/transport.rs`; this crate runs it over Unix-socket channels, and
//! `transport_shm_queue.rs` runs the same file over shared-memory queues.

mod common;
include!("suites/transport.rs");
