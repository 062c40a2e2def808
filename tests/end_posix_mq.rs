//! The graceful end (`suites/end.rs`) over ChannelKind::PosixMq channels: `common::kind()` picks the kind by this
//! crate's name.

mod common;
include!("suites/end.rs");
