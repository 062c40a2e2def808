//! The session protocol's pieces both sides use: the log-in request, waiting for a message
//! during log-in (a step at a time), the executable check.

use std::path::Path;

use super::core::Master;
use super::{Error, Metadata, Rejection};
use crate::msg::MsgIn;
use crate::schemas::session_capnp::master;
use crate::struc::{self, MsgType};

/// The session protocol's version: both sides must speak the same.
pub(crate) const PROTOCOL_VERSION: u32 = 1;

/// `Resource.kind`: what a resource message's fd is (see `schemas/session.capnp`).
pub(crate) const RES_SESSION_ARENA: u8 = 0;
pub(crate) const RES_APP_ARENA: u8 = 1;
pub(crate) const RES_INIT_BY_CLIENT: u8 = 2;
pub(crate) const RES_INIT_BY_SERVER: u8 = 3;

/// The message types named (fields of the master union).
pub(crate) fn types(names: &[&str]) -> Result<Vec<MsgType>, Error> {
    names
        .iter()
        .map(|n| Ok(MsgType::of::<Master>(n)?))
        .collect()
}

/// One step of waiting for a message of type `which` on the log-in channel, without blocking:
/// writes what the socket takes, takes in what arrived. `Ok(None)`: not yet. A message of a
/// type in `others` is a protocol error.
pub(crate) fn poll_for(
    core: &mut struc::Channel<Master>,
    which: MsgType,
    others: &[MsgType],
) -> Result<Option<MsgIn<Master>>, Error> {
    let cached = |core: &mut struc::Channel<Master>| -> Result<Option<MsgIn<Master>>, Error> {
        if others.iter().any(|t| core.cached(*t) > 0) {
            return Err(Error::Protocol("unexpected message during log-in"));
        }
        Ok(core.take_cached(which)?)
    };
    // Hosing errors come back from these calls themselves (the log-in channel's `on_error`
    // is never given one).
    core.flush()?;
    // An event at a time, looking after each: the peer may close the connection right after
    // sending what we wait for (a session dropped as soon as accepted), and reading on would
    // meet that end first.
    loop {
        if let Some(m) = cached(core)? {
            return Ok(Some(m));
        }
        if !core.step_ready()? {
            return Ok(None);
        }
    }
}

/// Checks that process `pid` runs the executable `exec_path` (`/proc/<pid>/exe`, compared with
/// `exec_path` once its links are resolved). `Err`: what differs, for humans.
pub(crate) fn check_exe(pid: i32, exec_path: &Path) -> Result<(), String> {
    let actual = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map_err(|e| format!("cannot read /proc/{pid}/exe: {e}"))?;
    let expected = std::fs::canonicalize(exec_path).unwrap_or_else(|_| exec_path.to_owned());
    if actual == expected {
        Ok(())
    } else {
        Err(format!(
            "process {pid} runs {}, not {}",
            actual.display(),
            expected.display()
        ))
    }
}

/// A parsed log-in request.
#[derive(Debug)]
pub(crate) struct LogInReq {
    pub protocol_version: u32,
    pub client_app: String,
    pub server_app: String,
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub shm: u8,
    pub channel_kind: u8,
    pub native_handles: bool,
    pub init_channels: u32,
    pub metadata: Option<Metadata>,
}

impl LogInReq {
    pub(crate) fn parse(m: &MsgIn<Master>) -> Result<LogInReq, (Rejection, String)> {
        let bad = |what: &str| (Rejection::BadRequest, format!("malformed log-in: {what}"));
        let root = m.root().map_err(|e| bad(&e.to_string()))?;
        let Ok(master::LogIn(Ok(l))) = root.which() else {
            return Err(bad("not a logIn"));
        };
        let text =
            |t: capnp::Result<capnp::text::Reader<'_>>| -> Result<String, (Rejection, String)> {
                t.ok()
                    .and_then(|t| t.to_str().ok().map(str::to_owned))
                    .ok_or_else(|| bad("names must be UTF-8 text"))
            };
        let config = l.get_config().map_err(|e| bad(&e.to_string()))?;
        let metadata = Metadata::from_wire(l.get_metadata().map_err(|e| bad(&e.to_string()))?)
            .map_err(|e| bad(&e.to_string()))?;
        Ok(LogInReq {
            protocol_version: l.get_protocol_version(),
            client_app: text(l.get_client_app())?,
            server_app: text(l.get_server_app())?,
            pid: l.get_pid(),
            uid: l.get_uid(),
            gid: l.get_gid(),
            shm: config.get_shm_kind(),
            channel_kind: config.get_channel_kind(),
            native_handles: config.get_native_handles(),
            init_channels: l.get_init_channels(),
            metadata,
        })
    }
}
