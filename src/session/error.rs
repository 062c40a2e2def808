use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::{shm, struc, transport};

/// Why a server refused a client's log-in. Both sides see it: the client from
/// [`sync_connect`](super::ClientSession::sync_connect), the server in its accept handler (and
/// it goes on serving others).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// The client named an app the server's universe does not know.
    UnknownClientApp,
    /// The client app is not in the server app's allow-list.
    ClientAppNotAllowed,
    /// The client meant to reach another server app.
    WrongServerApp,
    /// The connecting process's uid, gid or pid (`SO_PEERCRED`) differ from what it claims or
    /// from its `ClientApp`.
    Credentials,
    /// The connecting process's executable (`/proc/<pid>/exe`) is not its app's `exec_path`.
    ExecPath,
    /// The two sides speak different protocol versions.
    ProtocolVersion,
    /// The two sides' session configurations differ (SHM kind, channel kind, fd passing) or the
    /// request is out of bounds (too many init channels).
    Config,
    /// The server could not set the session up (e.g. no memory for its arena).
    Resources,
    /// The log-in request was malformed.
    BadRequest,
}

impl Rejection {
    /// The reason's code on the wire (`LogInRsp.rejected.reason` in `schemas/session.capnp`).
    pub fn code(self) -> u16 {
        match self {
            Rejection::UnknownClientApp => 1,
            Rejection::ClientAppNotAllowed => 2,
            Rejection::WrongServerApp => 3,
            Rejection::Credentials => 4,
            Rejection::ExecPath => 5,
            Rejection::ProtocolVersion => 6,
            Rejection::Config => 7,
            Rejection::Resources => 8,
            Rejection::BadRequest => 9,
        }
    }

    /// The reason a wire code stands for.
    pub fn from_code(c: u16) -> Option<Rejection> {
        Some(match c {
            1 => Rejection::UnknownClientApp,
            2 => Rejection::ClientAppNotAllowed,
            3 => Rejection::WrongServerApp,
            4 => Rejection::Credentials,
            5 => Rejection::ExecPath,
            6 => Rejection::ProtocolVersion,
            7 => Rejection::Config,
            8 => Rejection::Resources,
            9 => Rejection::BadRequest,
            _ => return None,
        })
    }
}

/// What can go wrong with sessions.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An app name that cannot name files (see [`App::name`](super::App::name)).
    BadAppName(String),
    /// A name the universe description does not know (an allowed client app missing from the
    /// master set, say).
    UnknownApp(String),
    /// The run dir (or a file in it) could not be made or used.
    RunDir {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The socket path is longer than a Unix socket address holds (107 bytes): use a shorter
    /// run dir.
    PathTooLong(PathBuf),
    /// Another instance of this server app is running (it holds the PID file's lock).
    AlreadyRunning {
        /// Its pid, as its PID file says.
        pid: Option<u32>,
    },
    /// No server is listening (no PID file, no socket, or nobody accepting). Not fatal: retry
    /// later (the README shows the loop).
    ServerAbsent(io::Error),
    /// The process listening on the server's socket is not the server app (uid, gid or
    /// executable differ).
    ServerIdentity(String),
    /// The server refused the log-in (both sides get this).
    LogInRejected {
        /// Why.
        reason: Rejection,
        /// Details for humans.
        detail: String,
    },
    /// The log-in did not complete in time.
    LogInTimeout,
    /// The peer broke the session protocol (the text says how).
    Protocol(&'static str),
    /// `open_channel`: the peer has no passive-open handler. Not fatal.
    PassiveOpenRejected,
    /// `open_channel`: no answer in time. Not fatal.
    OpenTimeout,
    /// The session is not open yet: a client before `sync_connect`, a server session before
    /// `init_handlers`.
    NotStarted,
    /// `sync_connect` on a connected session, or `init_handlers` twice.
    AlreadyStarted,
    /// `accept` waited its whole timeout.
    AcceptTimeout,
    /// The `SessionServer` was dropped before this accept completed.
    Aborted,
    /// Metadata larger than [`MAX_METADATA`](super::MAX_METADATA).
    MetadataTooLarge(usize),
    /// Metadata could not be built or read as the requested type.
    Metadata(capnp::Error),
    /// The session's peer went away (EOF, reset): the session is over.
    PeerGone,
    /// Nothing (not even a keep-alive ping) came from the peer for the idle timeout.
    IdleTimeout,
    /// A handle of another arena than the session's: it cannot be lent through the session.
    ForeignArena,
    /// A vanilla (heap) session has no arenas.
    NoArena,
    /// The session's master channel failed.
    Channel(struc::Error),
    /// A transport error.
    Transport(transport::Error),
    /// A shared-memory error.
    Shm(shm::Error),
    /// An OS error.
    Io(io::Error),
    /// The session was hosed by an error reported earlier.
    Hosed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadAppName(n) => write!(
                f,
                "bad app name {n:?}: use 1-64 letters, digits, '_', '-', '.' (not first)"
            ),
            Error::UnknownApp(n) => write!(f, "app {n:?} is not in the universe description"),
            Error::RunDir { path, .. } => write!(f, "run dir {}", path.display()),
            Error::PathTooLong(p) => write!(
                f,
                "socket path {} is longer than 107 bytes: use a shorter run dir",
                p.display()
            ),
            Error::AlreadyRunning { pid: Some(p) } => {
                write!(f, "another instance of the server app is running (pid {p})")
            }
            Error::AlreadyRunning { pid: None } => {
                f.write_str("another instance of the server app is running")
            }
            Error::ServerAbsent(_) => f.write_str("no server is running (retry later)"),
            Error::ServerIdentity(w) => write!(f, "the socket's server is not the server app: {w}"),
            Error::LogInRejected { reason, detail } => {
                write!(f, "log-in rejected ({reason:?}): {detail}")
            }
            Error::LogInTimeout => f.write_str("log-in did not complete in time"),
            Error::Protocol(w) => write!(f, "session protocol broken by the peer: {w}"),
            Error::PassiveOpenRejected => {
                f.write_str("the peer takes no channels (no passive-open handler)")
            }
            Error::OpenTimeout => f.write_str("opening a channel: no answer in time"),
            Error::NotStarted => f.write_str("the session is not open yet"),
            Error::AlreadyStarted => f.write_str("the session is open already"),
            Error::AcceptTimeout => f.write_str("no session accepted in time"),
            Error::Aborted => f.write_str("the session server was dropped first"),
            Error::MetadataTooLarge(n) => write!(
                f,
                "metadata of {n} bytes exceeds the limit of {}",
                super::MAX_METADATA
            ),
            Error::Metadata(_) => f.write_str("bad metadata"),
            Error::PeerGone => f.write_str("the session's peer is gone"),
            Error::IdleTimeout => f.write_str("nothing came from the session's peer in time"),
            Error::ForeignArena => f.write_str("the handle is not in one of the session's arenas"),
            Error::NoArena => f.write_str("a vanilla (heap) session has no arenas"),
            Error::Channel(_) => f.write_str("session channel failed"),
            Error::Transport(_) => f.write_str("session transport failed"),
            Error::Shm(_) => f.write_str("shared memory failed"),
            Error::Io(e) => e.fmt(f),
            Error::Hosed => f.write_str("session hosed by an error reported earlier"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::RunDir { source, .. } => Some(source),
            Error::ServerAbsent(e) => Some(e),
            // Transparent: it shows as the I/O error itself.
            Error::Io(e) => e.source(),
            Error::Metadata(e) => Some(e),
            Error::Channel(e) => Some(e),
            Error::Transport(e) => Some(e),
            Error::Shm(e) => Some(e),
            _ => None,
        }
    }
}

impl From<struc::Error> for Error {
    /// The session's view of a master-channel error: the peer's end or silence are the
    /// session's own errors; `Hosed` stays `Hosed`.
    fn from(e: struc::Error) -> Self {
        use crate::msg;
        match e {
            struc::Error::Hosed | struc::Error::Msg(msg::Error::Hosed) => Error::Hosed,
            struc::Error::Msg(msg::Error::Transport(t)) => match t {
                transport::Error::PeerGone
                | transport::Error::Reset
                | transport::Error::Truncated { .. } => Error::PeerGone,
                transport::Error::IdleTimeout => Error::IdleTimeout,
                transport::Error::Hosed => Error::Hosed,
                other => Error::Transport(other),
            },
            other => Error::Channel(other),
        }
    }
}

impl From<transport::Error> for Error {
    fn from(e: transport::Error) -> Self {
        Error::from(struc::Error::from(e))
    }
}

impl From<shm::Error> for Error {
    fn from(e: shm::Error) -> Self {
        Error::Shm(e)
    }
}

/// The errors that end a session: the peer gone or silent, a protocol breach, and the master
/// channel's own hosing errors.
impl crate::hosing::HosingError for Error {
    const TARGET: &'static str = "flowipc::session";

    /// A session's end is news at the session's level too (its master channel logged the
    /// transport's detail): the peer gone is info, the rest a warning.
    fn log_level(&self) -> Option<log::Level> {
        match self {
            Error::Hosed => None,
            Error::PeerGone => Some(log::Level::Info),
            _ => Some(log::Level::Warn),
        }
    }

    fn is_hosing(&self) -> bool {
        match self {
            Error::PeerGone | Error::IdleTimeout | Error::Protocol(_) | Error::Hosed => true,
            Error::Channel(c) => c.is_hosing(),
            Error::Transport(t) => t.is_hosing(),
            _ => false,
        }
    }

    fn hosed() -> Self {
        Error::Hosed
    }
}
