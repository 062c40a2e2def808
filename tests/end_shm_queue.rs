//! The graceful end (`suites/end.rs`) over ChannelKind::ShmQueue channels: `common::kind()` picks the kind by this
//! crate's name.

mod common;
include!("suites/end.rs");
