//! Generated Cap'n Proto code for the schemas bundled with flowipc.
//!
//! These are example and test schemas; flowipc's channels work with any schema (see the README's
//! "Your own schemas"). Each module is the `capnpc` output for one file in `schemas/`:
//!
//! * [`perf_demo_capnp`] from `schemas/perf_demo.capnp`, after Flow-IPC's perf_demo: the root
//!   `Body` is either a request for a file by name or a response carrying the file in parts, each
//!   with the size and hash to verify it by.
//! * [`test_msgs_capnp`] from `schemas/test_msgs.capnp`, the messages the tests and examples of
//!   structured channels use, modelled on Flow-IPC's `CoolMsg` example: the root `CoolMsg` (an
//!   anonymous union of hello, sum request/response, best shot, chunked blob and ping), and
//!   `NoUnion`, a root without an anonymous union, which structured channels must reject; and
//!   `ChannelMdt`, the channel-open metadata of the session tests and examples.
//! * [`session_capnp`] from `schemas/session.capnp`: the session protocol, what a client and a
//!   server say on a session's master channel (log-in, resources, channel opening). flowipc's
//!   [`session`](crate::session) module speaks it; you never need to.
//!
//! The generated code is committed, so building flowipc needs no `capnp` tool and no build
//! script. After editing a schema, run `cargo run -p xtask -- capnp` (a pinned capnp 1.4.0,
//! embedded, plus `capnpc` 0.27); `cargo run -p xtask -- capnp --check` fails when the committed
//! code is stale. The generated files are left exactly as generated (`#[rustfmt::skip]`), so the
//! check is byte for byte.
//!
//! # Example
//!
//! Building a message with the generated code and reading it back (here in one plain heap
//! message; flowipc's channels put the segments in shared memory instead):
//!
//! ```
//! use capnp::message;
//! use flowipc::schemas::perf_demo_capnp::body;
//!
//! let mut message = message::Builder::new_default();
//! let root = message.init_root::<body::Builder>();
//! root.init_get_cache_req().set_file_name("/var/cache/part-0001.bin");
//!
//! let body = message.get_root_as_reader::<body::Reader>()?;
//! match body.which()? {
//!     body::GetCacheReq(req) => {
//!         assert_eq!(req?.get_file_name()?.to_str()?, "/var/cache/part-0001.bin");
//!     }
//!     body::GetCacheRsp(_) => panic!("wrote a request, read a response"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// The generated modules: not formatted (`cargo run -p xtask -- capnp --check` compares them byte
// for byte with fresh output) and not documented (capnpc emits no docs), hence the allowances.
// They contain no `unsafe`; `deny(unsafe_code)` keeps it that way (`unsafe` lives only in `shm`
// and the syscall module), so a future capnpc that emits some must be looked at, not waved
// through. Every schema in `schemas/` needs its line here: the xtask checks, never rewrites.

#[rustfmt::skip]
#[allow(missing_docs, missing_debug_implementations, unused, clippy::all, clippy::pedantic)]
#[deny(unsafe_code)]
pub mod perf_demo_capnp;

#[rustfmt::skip]
#[allow(missing_docs, missing_debug_implementations, unused, clippy::all, clippy::pedantic)]
#[deny(unsafe_code)]
pub mod test_msgs_capnp;

#[rustfmt::skip]
#[allow(missing_docs, missing_debug_implementations, unused, clippy::all, clippy::pedantic)]
#[deny(unsafe_code)]
pub mod session_capnp;
