//! The session suite (`suites/session.rs`) over `ChannelKind::PosixMq` channels: `common::kind()`
//! picks the kind by this crate's name.

mod common;
include!("suites/session.rs");
