//! The transport suite (`suites/transport.rs`) over `ChannelKind::PosixMq` channels: `common::kind()`
//! picks the kind by this crate's name.

mod common;
include!("suites/transport.rs");
